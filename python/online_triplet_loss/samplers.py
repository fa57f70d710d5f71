r"""Batch samplers for online mining.

Online mining needs positives and negatives in every batch; a P×K batch holds
:math:`P` classes with :math:`K` samples each (Hermans et al., "In Defense of
the Triplet Loss", 2017).
"""

from __future__ import annotations

import collections.abc
import math
import numbers
import os
import random
from typing import Dict, Hashable, Iterator, List, Optional, Sequence, Union

import torch
from torch.utils.data import Sampler

from ._core import HostOutOfMemoryError
from ._validation import check_dense, check_int, refuse_python_dispatch

__all__ = ["PKSampler"]


def _check_int(name: str, value: object, minimum: int) -> int:
    return check_int(name, value, minimum)


def _check_readable(labels: torch.Tensor, whole: bool) -> None:
    """A tensor whose values Python can read, on any device: all of them at
    once (``tolist``, ``whole``) or a 0-d one's (``item``)."""
    check_dense("labels", labels)
    if labels.device.type == "meta":
        raise ValueError("labels: must hold values, got a tensor on the meta device")
    if whole:
        if labels.is_quantized:
            raise ValueError(f"labels: must hold class ids, got a quantized tensor ({labels.dtype}); "
                             "pass its int_repr() or dequantize() it")
        refuse_python_dispatch("labels", labels)


def _class_id(value: object) -> Hashable:
    """A label as a class id: 0-d tensors and arrays (and numpy scalars) by
    their value, so that ``tensor(3)``, ``np.int64(3)`` and ``3`` are one class."""
    if isinstance(value, torch.Tensor):
        _check_readable(value, whole=False)
    if isinstance(value, torch.Tensor) or (hasattr(value, "ndim") and hasattr(value, "item")):
        if value.ndim != 0:
            raise ValueError(
                "labels: must be 1-D and hold class ids; got an element of shape "
                f"{tuple(value.shape)}"
            )
        return value.item()
    if isinstance(value, list) or not isinstance(value, Hashable):
        raise ValueError(f"labels: must be 1-D and hold hashable class ids, got {value!r}")
    return value


def _label_list(labels: object) -> List[Hashable]:
    if isinstance(labels, torch.Tensor):
        _check_readable(labels, whole=True)
        if labels.dim() != 1:
            raise ValueError(f"labels: must be 1-D, got a tensor of shape {tuple(labels.shape)}")
        return [_Unequal() if _is_nan(i) else i for i in labels.tolist()]
    if isinstance(labels, (str, bytes)):
        raise ValueError(f"labels: must be a sequence of class ids, got {labels!r}")
    if isinstance(labels, (collections.abc.Set, collections.abc.Mapping)):
        # The sampler yields positions in labels: a set's order is
        # arbitrary, and a mapping's keys are not one label per sample.
        raise ValueError(
            "labels: must be a sequence of class ids, one per sample in the dataset's order, "
            f"got a {type(labels).__name__}"
        )
    if getattr(labels, "ndim", 1) != 1:  # numpy arrays
        raise ValueError(
            f"labels: must be 1-D and hold hashable class ids, got an array of shape "
            f"{tuple(labels.shape)}"
        )
    try:
        # numpy arrays and the like convert to Python numbers in one go.
        values = labels.tolist() if hasattr(labels, "ndim") and hasattr(labels, "tolist") else list(labels)
    except TypeError:
        raise ValueError(
            f"labels: must be a sequence of class ids, got {type(labels).__name__}"
        ) from None
    return [_Unequal() if _is_nan(i) else i for i in map(_class_id, values)]


def _is_nan(value: Hashable) -> bool:
    return isinstance(value, float) and value != value


class _Unequal:
    """The class id of a NaN label: equal to nothing else. A dict finds the
    same NaN object by identity, so repeated ``math.nan`` would share a class."""

    def __repr__(self) -> str:
        return "nan"


class PKSampler(Sampler[List[int]]):
    r"""Yields batches of :math:`P` distinct classes with :math:`K` indices each.

    Pass it as ``DataLoader(dataset, batch_sampler=PKSampler(labels, p, k))``.
    Every batch holds exactly :math:`P \cdot K` indices: :math:`K` consecutive
    indices of one class, then :math:`K` of the next, for :math:`P` distinct
    classes in random order.

    An epoch is built in three steps, all drawn from a generator seeded with
    ``(seed, epoch)``:

    1. Each class's indices are shuffled and cut into groups of :math:`K`. The
       last group of a class is completed with other indices of the same
       class, drawn at random, so that no group repeats an index. A class with
       fewer than :math:`K` samples has a single group that repeats its samples
       as evenly as possible (each appears :math:`\lfloor K/n \rfloor` or
       :math:`\lceil K/n \rceil` times); it is the only way an index repeats
       within a batch.
    2. The :math:`G = \sum_c \lceil n_c / K \rceil` groups are spread over
       :math:`N = \max(\lceil G / P \rceil, \max_c \lceil n_c/K \rceil)`
       batches, rounded up to a multiple of ``world_size``, with no class
       twice in a batch: taking the classes in random order, their groups
       are dealt to the batches in cycles, each cycle a fresh random order of
       all batches, so batches differ by at most one group.
    3. Places left free are filled with fresh groups of classes absent from
       the batch, drawn at random; then the batches are shuffled.

    So every epoch covers every index at least once (every class in
    particular), and small classes are oversampled only as much as filling
    the batches needs; a large class, at most :math:`K` indices a batch, can
    take a smaller share of an epoch than of the data. ``len(sampler)`` is
    :math:`N /` ``world_size``, known without drawing. Call
    :meth:`set_epoch` before each epoch to vary it.

    With ``world_size > 1`` every rank builds the same epoch and takes every
    ``world_size``-th batch starting at ``rank``: the ranks get the same
    number of batches, different batches of one epoch (which can still hold
    the same indices: a class's groups and the groups that fill free places
    are drawn independently).

    Args:
        labels: the class of every sample of the dataset, in its order, as a
            1-D tensor, array or sequence of hashable class ids (not a set,
            whose order is arbitrary, or a mapping). 0-d tensors and arrays
            and numpy scalars count by value (``[dataset[i][1] for i in
            ...]`` works), as do equal ints and floats: ``tensor(1)``,
            ``np.int64(1)``, ``1`` and ``1.0`` are one class. Each NaN is a
            class of its own.
        p: classes per batch, :math:`1 \le P \le` the number of classes.
        k: samples per class, :math:`\ge 1`. An epoch is built whole when
            iteration starts; one too big for the host's memory raises
            :class:`~online_triplet_loss.HostOutOfMemoryError` then.
        seed: seeds the shuffling, together with the epoch. Default: 0.
        rank: this process's rank, :math:`0 \le` ``rank`` :math:`<`
            ``world_size``. Default: 0.
        world_size: the number of processes sharing the epoch, each of which
            builds it whole: one that rounds it up past the host's memory
            raises :class:`~online_triplet_loss.HostOutOfMemoryError`, as
            ``k`` does. Default: 1.

    Example::

        >>> labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3])
        >>> sampler = PKSampler(labels, p=2, k=2, seed=1)
        >>> len(sampler)
        3
        >>> batches = list(sampler)
        >>> all(len({labels[i].item() for i in batch}) == 2 for batch in batches)
        True
        >>> sampler.set_epoch(1)  # a different order next epoch
    """

    def __init__(
        self,
        labels: Union[torch.Tensor, Sequence[Hashable]],
        p: int,
        k: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        values = _label_list(labels)
        if not values:
            raise ValueError("labels: must hold at least one sample, got an empty sequence")
        # Read-only: the number of batches is counted from them here.
        self._p = _check_int("p", p, 1)
        self._k = _check_int("k", k, 1)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed: must be an int, got {seed!r}")
        self._seed = int(seed)
        self._world_size = _check_int("world_size", world_size, 1)
        self._rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(
                f"rank: must be < world_size ({self.world_size}), got {rank!r}"
            )
        by_class: Dict[Hashable, List[int]] = {}
        for index, label in enumerate(values):
            by_class.setdefault(label, []).append(index)
        if self.p > len(by_class):
            raise ValueError(
                f"p: must be at most the number of classes ({len(by_class)}), got {p!r}"
            )
        # In order of first appearance, so that the epoch depends only on the labels.
        self._classes: List[List[int]] = list(by_class.values())
        self._epoch = 0
        self._batches = math.ceil(self._data_batches() / self.world_size) * self.world_size

    def _data_batches(self) -> int:
        """N before it is rounded up to a multiple of ``world_size``."""
        groups = [math.ceil(len(indices) / self.k) for indices in self._classes]
        return max(math.ceil(sum(groups) / self.p), max(groups))

    def __setstate__(self, state: Dict[str, object]) -> None:
        # Samplers pickled when these settings were plain attributes.
        for name in ("p", "k", "seed", "rank", "world_size", "epoch"):
            if name in state:
                state["_" + name] = state.pop(name)
        self.__dict__.update(state)

    @property
    def p(self) -> int:
        """Classes per batch."""
        return self._p

    @property
    def k(self) -> int:
        """Samples per class in a batch."""
        return self._k

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def epoch(self) -> int:
        """The epoch the next iteration draws; setting it is :meth:`set_epoch`."""
        return self._epoch

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self._epoch = _check_int("epoch", epoch, 0)

    @property
    def num_classes(self) -> int:
        """The number of distinct classes in ``labels``."""
        return len(self._classes)

    @property
    def batch_size(self) -> int:
        r""":math:`P \cdot K`."""
        return self.p * self.k

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that the next iteration draws; call it before each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self._batches // self.world_size

    def __iter__(self) -> Iterator[List[int]]:
        # An epoch takes at least 8 bytes an index (a list's pointer): one
        # beyond the host's memory is refused before it fills it, which
        # would take minutes, or the OOM killer.
        indices = self._batches * self.p * self.k
        try:
            host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            host = None
        if host is not None and host <= 0:
            host = None
        if host is not None and 8 * indices > host:
            raise HostOutOfMemoryError(self._too_big(
                f" (at least {8 * indices / 2**30:.3g} GiB, more than the host's "
                f"{host / 2**30:.3g})", host))
        try:
            batches = self._epoch_batches(self.epoch)
        except MemoryError as err:
            # Python's own names nothing (it is often empty).
            raise HostOutOfMemoryError(self._too_big("", host)) from err
        return iter(batches[self.rank :: self.world_size])

    def _too_big(self, size: str, host: Optional[int]) -> str:
        """The message of an epoch too big for the host, naming ``world_size``
        when rounding up to a multiple of it at least doubled the epoch and
        the epoch of the data alone would fit (as far as ``host``, the host's
        memory in bytes, tells), and ``k`` otherwise."""
        data = self._data_batches()
        whole = f"an epoch of {self._batches} batches of p * k = {self.p} * {self.k} indices{size}"
        data_fits = host is None or 8 * data * self.p * self.k <= host
        if self._batches >= 2 * data and data_fits:
            return (f"world_size: {whole}, {data} of the data's rounded up to a multiple of "
                    f"world_size={self.world_size}, could not be held in memory")
        return f"k: {whole} could not be held in memory"

    def _group(self, rng: random.Random, indices: List[int]) -> List[int]:
        """K indices of one class, drawn at random; repeats only when the class is small."""
        if len(indices) >= self.k:
            return rng.sample(indices, self.k)
        return self._pad(rng, rng.sample(indices, len(indices)))

    def _pad(self, rng: random.Random, shuffled: List[int]) -> List[int]:
        """Repeats a class smaller than K evenly up to K indices."""
        repeats, extra = divmod(self.k, len(shuffled))
        group = shuffled * repeats + rng.sample(shuffled, extra)
        rng.shuffle(group)
        return group

    def _class_groups(self, rng: random.Random, indices: List[int]) -> List[List[int]]:
        """One epoch of a class: every index at least once, cut into groups of K."""
        order = rng.sample(indices, len(indices))
        if len(order) < self.k:
            return [self._pad(rng, order)]
        groups = [order[i : i + self.k] for i in range(0, len(order), self.k)]
        last = groups[-1]
        if len(last) < self.k:
            taken = set(last)
            rest = [i for i in indices if i not in taken]
            last.extend(rng.sample(rest, self.k - len(last)))
        return groups

    def _absent_classes(self, rng: random.Random, present: List[int], need: int) -> List[int]:
        """``need`` distinct classes not in ``present``, uniformly at random.
        Listing the absent classes costs O(classes) a batch, which made an
        epoch with one dominant class (many batches to fill) quadratic; while
        at least half of all classes stay absent, drawing and redrawing
        costs under two draws a class instead."""
        classes = len(self._classes)
        taken = set(present)
        if 2 * (len(taken) + need) > classes:
            return rng.sample([c for c in range(classes) if c not in taken], need)
        chosen: List[int] = []
        while len(chosen) < need:
            c = rng.randrange(classes)
            if c not in taken:
                taken.add(c)
                chosen.append(c)
        return chosen

    def _epoch_batches(self, epoch: int) -> List[List[int]]:
        """The whole epoch, identical on every rank."""
        rng = random.Random(f"PKSampler:{self.seed}:{epoch}")
        n = self._batches
        class_order = rng.sample(range(len(self._classes)), len(self._classes))
        slots: List[List[int]] = [[] for _ in range(n)]  # class ids per batch
        contents: List[List[List[int]]] = [[] for _ in range(n)]
        # Groups are dealt to the batches in cycles, each cycle a fresh random
        # order of all n batches, so batch sizes differ by at most one group.
        # A class has at most n groups; one that straddles two cycles takes
        # the rest of the old cycle and then batches it is not in yet.
        cycle = rng.sample(range(n), n)
        position = 0
        for c in class_order:
            groups = self._class_groups(rng, self._classes[c])
            if position + len(groups) <= n:
                targets = cycle[position : position + len(groups)]
                position += len(groups)
            else:
                targets = cycle[position:]
                taken = set(targets)
                fresh = [b for b in range(n) if b not in taken]
                rng.shuffle(fresh)
                cycle = fresh + rng.sample(targets, len(targets))
                position = len(groups) - len(targets)
                targets = targets + cycle[:position]
            for b, group in zip(targets, groups):
                slots[b].append(c)
                contents[b].append(group)
        batches = []
        for present, groups in zip(slots, contents):
            need = self.p - len(present)
            if need > 0:
                for c in self._absent_classes(rng, present, need):
                    groups.append(self._group(rng, self._classes[c]))
            rng.shuffle(groups)
            batches.append([i for group in groups for i in group])
        rng.shuffle(batches)
        return batches
