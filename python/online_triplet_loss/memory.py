r"""Cross-batch memory (XBM; Wang et al., "Cross-Batch Memory for Embedding
Learning", CVPR 2020): mine each batch against the embeddings of past batches
too."""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import _native as native
from ._core import HostOutOfMemoryError
from .distributed import DistributedTripletLoss, _dtype_code, _dtype_shown, _tensor_problem
from .losses import BatchAllTripletLoss, BatchHardTripletLoss, BatchSemiHardTripletLoss, _TripletLoss, loss_of
from ._validation import (
    INT64_MAX,
    LABEL_DTYPES,
    check_distance,
    check_int,
    check_labels,
    check_tensor,
    refuse_scripting,
    refuse_tracing,
)

__all__ = ["CrossBatchMemory"]

_TripletModule = Union[
    BatchAllTripletLoss, BatchHardTripletLoss, BatchSemiHardTripletLoss, DistributedTripletLoss
]



class CrossBatchMemory(nn.Module):
    r"""Wraps a triplet loss so that every batch is mined against a memory of
    past embeddings as well as against itself.

    The memory is a FIFO queue of the last ``memory_size`` embeddings seen,
    detached, with their labels. ``forward(embeddings, labels)``:

    1. computes the wrapped loss with the batch as anchors and
       :math:`\text{cat}(\text{batch}, \text{memory})` as the reference set that
       positives and negatives are drawn from; an anchor is never its own
       positive, and the memory never holds the current batch;
    2. then, in training mode (the default), enqueues the batch, dropping
       the oldest entries beyond ``memory_size``. In eval mode
       (``module.eval()``) it enqueues nothing, as batch norm updates no
       statistics there: a validation loss is mined against the memory and
       leaves it as training left it, without held-out embeddings in it.
       :meth:`enqueue` adds a batch in either mode.

    Wrapping a :class:`~online_triplet_loss.distributed.DistributedTripletLoss`
    makes the memory global: under a process group of several ranks, each
    rank passes its own batch, the loss is that of the global batch (all
    ranks' batches, concatenated in rank order) against itself and the
    memory, and the whole global batch is enqueued, so the memory is the same
    on every rank. :math:`N` ranks then take the steps that one process with
    the wrapped loss would take on the concatenated batches: the same loss on
    every rank and, with :class:`~torch.nn.parallel.DistributedDataParallel`,
    the same parameters. Every rank must call ``forward`` together. Without a
    group of several ranks it is the same as wrapping the inner loss.

    Gradients reach the current batch (as anchors and as references) and
    never the memory. The loss keeps the wrapped module's normalisation:
    batch-all averages over the positive triplets, batch-hard over the
    anchors with a positive and a negative, semi-hard over the positive pairs.
    ``forward`` reads one flag from the device, whether the batch is all
    finite (see below), and otherwise synchronises only where a
    :class:`~online_triplet_loss.distributed.DistributedTripletLoss` on
    several ranks does (gathering the batch sizes, once for the loss and once
    to enqueue the global batch).

    Rows with a NaN or Inf coordinate are never stored: the loss of the batch
    that holds them is NaN, as for the wrapped loss, but they do not poison
    the losses of later batches; for the same reason a module cast
    (``.half()``) that would overflow a stored row raises a ``ValueError``,
    leaving the memory as it was (a model it is part of keeps the cast of
    the modules cast before it). The memory is filled under
    :func:`torch.no_grad` and outside :func:`torch.inference_mode`, so a
    batch enqueued under either leaves a memory that training can go on
    with. One module may be shared by threads: each call mines against the
    memory and enqueues its batch while holding the module's lock.
    :meth:`load_state_dict` accepts only the state of a memory of the same
    ``memory_size`` (and ``embedding_dim``, when set), with floating-point
    embeddings whose stored rows are finite in the dtype they are loaded into
    (the memory's own, unless ``assign=True``).

    The memory's dtype and device are those of the first batch (or of the
    module after ``.to()`` when ``embedding_dim`` is given); later batches are
    stored in that dtype and must be on that device. Labels must keep the
    dtype of the first batch's. The memory is saved in ``state_dict``. Its
    position and count are the module's own, so buffers that replace its
    buffers (:func:`torch.func.functional_call` given them, or the replicas of
    :class:`~torch.nn.DataParallel`, which would fill copies that are then
    dropped) make ``forward`` raise; use DDP.

    XBM works once the embeddings drift slowly; the paper starts it after a
    warm-up. To delay it, call the wrapped loss directly for the first steps,
    or :meth:`enqueue` without using the loss.

    Args:
        loss: a :class:`BatchAllTripletLoss`, :class:`BatchHardTripletLoss`,
            :class:`BatchSemiHardTripletLoss` (its ``margin``, ``distance`` and
            ``soft`` are used) or a
            :class:`~online_triplet_loss.distributed.DistributedTripletLoss`
            wrapping one of them (for a memory shared by all ranks).
        memory_size: the capacity of the memory, :math:`\ge 1`.
        embedding_dim: the embedding size :math:`D`; by default that of the first
            batch. Giving it allocates the memory at once, in torch's
            default dtype (float32 unless set otherwise); ``.to()`` moves and
            casts it. Both are fixed once the memory has its buffers: an
            attribute set to another value later is refused (a ``ValueError``)
            where the memory is used.

    Shape:
        - embeddings: :math:`(B, D)`, floating point; with a distributed loss,
          this rank's batch, :math:`(B_r, D)`.
        - labels: :math:`(B)`, class ids (:math:`(B_r)` likewise).
        - Output: scalar.

    Example::

        >>> from online_triplet_loss import BatchHardTripletLoss
        >>> criterion = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=64)
        >>> for _ in range(3):
        ...     embeddings = torch.randn(16, 8, requires_grad=True)
        ...     loss = criterion(embeddings, torch.randint(0, 4, (16,)))
        ...     loss.backward()
        >>> criterion.num_stored
        48
    """

    def __init__(
        self,
        loss: _TripletModule,
        *,
        memory_size: int,
        embedding_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.loss = _check_loss(loss)
        self.memory_size = _positive_int("memory_size", memory_size)
        if embedding_dim is not None:
            embedding_dim = _positive_int("embedding_dim", embedding_dim)
        _check_capacity(self.memory_size, embedding_dim or 1, torch.get_default_dtype().itemsize,
                        "memory_size" if embedding_dim is None else "memory_size and embedding_dim")
        self.embedding_dim = embedding_dim
        # A ring buffer: `_next` is where the next entry goes, `_count` how many
        # are stored. Both live on the host, so bookkeeping never syncs.
        self._next = 0
        self._count = 0
        # Entries stored since the memory was last empty: ranks whose
        # memories agree on position and count can still differ here (one
        # loaded an earlier checkpoint of the run, or skipped a step in
        # eval mode), which the distributed exchange then tells.
        self._enqueued = 0
        # Held from reading the memory to updating the ring, so that threads
        # sharing the module each mine against and enqueue whole batches.
        self._lock = threading.RLock()
        self.register_buffer("memory_embeddings", None)
        self.register_buffer("memory_labels", None)
        if embedding_dim is not None:
            self.memory_embeddings = _allocated(
                lambda: torch.zeros(self.memory_size, embedding_dim), torch.device("cpu"),
                self.memory_size, embedding_dim, torch.get_default_dtype().itemsize,
                "memory_size and embedding_dim")
        self._own_buffers()

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()  # a copy, without what torch.compile added
        state.pop("_lock", None)  # a lock cannot be pickled or copied
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.RLock()
        if "_ring" not in self.__dict__:  # pickled by an earlier version
            self._own_buffers()
        if "_enqueued" not in self.__dict__:  # likewise
            self._enqueued = self._count

    def _own_buffers(self) -> None:
        """Records the buffers that ``_next`` and ``_count`` describe."""
        self._ring = (self._buffers["memory_embeddings"], self._buffers["memory_labels"])

    def _check_buffers(self) -> None:
        """Refuses buffers that another hand put in place of the module's:
        the ring's position and count describe the module's own, so others
        would be mined, and written to, as if they held what it stored."""
        ring = (self._buffers["memory_embeddings"], self._buffers["memory_labels"])
        if any(now is not own for now, own in zip(ring, self._ring)):
            raise RuntimeError(
                f"{type(self).__name__}: its buffers were replaced by other tensors "
                "(torch.func.functional_call with buffers, nn.DataParallel's replicas, or an "
                "assignment), but the ring's position and count are the module's own and "
                "describe its buffers; to set the memory, use load_state_dict"
            )

    def _check_settings(self) -> None:
        """Refuses a ``memory_size`` or ``embedding_dim`` assigned after
        construction that the memory cannot serve: a size other than that of
        its buffers, whose ring position and count it keeps, or a width
        other than theirs."""
        size = _positive_int("memory_size", self.memory_size)
        for buffer in (self.memory_embeddings, self.memory_labels):
            if buffer is not None and buffer.shape[0] != size:
                raise ValueError(
                    f"memory_size: the memory holds {buffer.shape[0]} entries, got {size!r}; "
                    "a CrossBatchMemory keeps the size it was made with (make a new one)"
                )
        width = self.embedding_dim
        stored = self.memory_embeddings
        if width is not None:
            width = _positive_int("embedding_dim", width)
        if stored is not None and width != stored.shape[1]:
            raise ValueError(
                f"embedding_dim: the memory holds embeddings of {stored.shape[1]} columns, "
                f"got {width!r}"
            )

    def __prepare_scriptable__(self) -> "CrossBatchMemory":
        refuse_scripting(type(self).__name__)
        return self

    def extra_repr(self) -> str:
        return f"memory_size={self.memory_size}, embedding_dim={self.embedding_dim}, stored={self._count}"

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Module casts (.half(), .double(), .to(dtype)) convert floating-point
        # buffers; float labels would merge classes (2049.0 becomes 2048.0 in
        # float16) and change the dtype later batches must keep. The labels
        # follow the module to its device only.
        self._refuse_overflowing_cast(fn)
        labels = self._buffers.get("memory_labels")
        if labels is None:
            super()._apply(fn, recurse)
            self._own_buffers()
            return self
        self._buffers["memory_labels"] = None
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["memory_labels"] = labels
        self._buffers["memory_labels"] = labels.to(fn(labels).device)
        self._own_buffers()
        return self

    def _refuse_overflowing_cast(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Raises, before anything is cast, when the module cast ``fn`` would
        turn a stored row into NaN or Inf (1e5 in float16): rows that would
        make every later loss NaN, which the memory never stores (a copy of
        the stored rows, where they are, is cast to find out)."""
        stored = self._buffers.get("memory_embeddings")
        if stored is None or self._count == 0:
            return
        dtype = fn(stored[:1]).dtype
        if dtype == stored.dtype or bool(torch.isfinite(stored[: self._count].to(dtype)).all()):
            return
        raise ValueError(
            f"dtype: {type(self).__name__} cannot be cast to {dtype}: its stored embeddings "
            f"(in {stored.dtype}) would hold NaN or Inf, which would make every later loss NaN; "
            "reset() it first, or keep it in a wider dtype"
        )

    @property
    def num_stored(self) -> int:
        """The number of embeddings stored, at most ``memory_size``."""
        return self._count

    @property
    def memory(self) -> Tuple[Tensor, Tensor]:
        """The stored ``(embeddings, labels)``, oldest first: copies, which
        later batches leave alone."""
        with self._lock:
            return self._stored()

    def _stored(self) -> Tuple[Tensor, Tensor]:
        self._check_buffers()
        self._check_settings()
        if self._count == 0 or self.memory_labels is None:
            # Empty, in the buffers' dtypes and device where there are buffers.
            dim = 0 if self.embedding_dim is None else self.embedding_dim
            stored, labels = self.memory_embeddings, self.memory_labels
            return (torch.empty(0, dim) if stored is None else stored.new_empty(0, dim),
                    torch.empty(0, dtype=torch.long) if labels is None else labels.new_empty(0))
        order = self._order()
        return self.memory_embeddings[order], self.memory_labels[order]

    def _order(self) -> Tensor:
        if self._count < self.memory_size:
            return torch.arange(self._count, device=self.memory_embeddings.device)
        return torch.cat([
            torch.arange(self._next, self.memory_size),
            torch.arange(0, self._next),
        ]).to(self.memory_embeddings.device)

    def reset(self) -> None:
        """Empties the memory, keeping its buffers."""
        with self._lock:
            self._next = 0
            self._count = 0
            self._enqueued = 0

    @native.boundary
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The loss of the batch against itself and the memory; then, in
        training mode, enqueues the batch (with a distributed loss, the global
        batch).

        Args:
            embeddings: the batch, :math:`(B, D)`; with a distributed loss,
                this rank's.
            labels: their labels, :math:`(B)`.

        Returns:
            The loss, a scalar in the dtype of ``embeddings``.
        """
        refuse_tracing(type(self).__name__)
        with self._lock:
            return self._forward(embeddings, labels)

    def _forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        self._check_buffers()
        self._check_settings()
        if isinstance(_check_loss(self.loss), DistributedTripletLoss):
            return self._forward_distributed(embeddings, labels)
        self._check_batch(embeddings, labels)
        # In the dtype the loss computes in under autocast (float32), as on
        # several ranks. The memory goes in as stored: the loss casts
        # references to the dtype it computes in (float32 for a half batch),
        # where rounding a float32 memory to the batch's dtype first would
        # lose its digits, or overflow a finite row to inf.
        anchors, = native.autocast_inputs(embeddings)
        if self._count == 0:
            # An empty memory: the batch against itself, exactly the wrapped loss.
            ref_embeddings = ref_labels = None
        else:
            # The batch, then the memory, in parts: the core computes no
            # gradient for the memory, which requires none.
            stored = slice(0, self._count)
            ref_embeddings = (anchors, self.memory_embeddings[stored])
            ref_labels = torch.cat([labels, self.memory_labels[stored].to(labels.device)])
        loss = loss_of(
            self.loss.mining,
            labels,
            anchors,
            self.loss.margin,
            distance=check_distance(self.loss.distance),
            soft=self.loss.soft,
            ref_embeddings=ref_embeddings,
            ref_labels=ref_labels,
            anchor_offset=0,
        )
        if self.training:
            self.enqueue(embeddings, labels)
        return loss

    def _forward_distributed(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        # The global batch first: the gather holds every rank to one width
        # and dtype, so the memory's checks (the same memory on every rank)
        # then pass or fail on all of them, instead of one rank raising while
        # the others wait in a collective.
        # The memory must be the same on every rank too: one loaded from a
        # checkpoint on one rank alone would fail its checks there, or mine
        # against references the others do not have.
        # A rank's own problem (embeddings no dense tensor, or on another
        # device than its memory) goes into the gather, so that every rank raises.
        problem = _tensor_problem("embeddings", embeddings) or self._device_problem(embeddings)
        stored, stored_labels = self.memory_embeddings, self.memory_labels
        settings = [
            ("memory (memory_size)", self.memory_size, int),
            ("memory (entries stored)", self._count, int),
            ("memory (entries stored since it was empty)", self._enqueued, int),
            ("memory (training mode, which stores the batch)", int(self.training), bool),
            ("memory (next place)", self._next, int),
            ("memory (embedding width)", -1 if stored is None else stored.shape[1], int),
            ("memory (embeddings dtype)", _dtype_code(None if stored is None else stored.dtype),
             _dtype_shown),
            ("memory (labels dtype)",
             _dtype_code(None if stored_labels is None else stored_labels.dtype), _dtype_shown),
        ]
        with torch.no_grad():
            all_embeddings, all_labels, _ = self.loss._gather(
                embeddings if problem else embeddings.detach(), labels, problem, settings
            )
        self._check_batch(all_embeddings, all_labels)
        extra_embeddings = extra_labels = None
        if self._count > 0:
            # The same slice (ring order) as the plain path, so that both
            # paths see the references in the same order and agree exactly.
            stored = slice(0, self._count)
            extra_embeddings = self.memory_embeddings[stored]
            extra_labels = self.memory_labels[stored]
        loss = self.loss(
            embeddings, labels, extra_embeddings=extra_embeddings, extra_labels=extra_labels
        )
        if self.training:
            self.enqueue(all_embeddings, all_labels)
        return loss

    def enqueue(self, embeddings: Tensor, labels: Tensor) -> None:
        """Adds a batch to the memory (detached), dropping the oldest entries
        beyond ``memory_size``. It stores what it is given, except rows with a
        NaN or Inf coordinate: with a distributed loss, pass the global batch
        (see :meth:`~online_triplet_loss.distributed.DistributedTripletLoss.gather`)
        to keep the memory the same on every rank. Reads from the device
        whether the batch is all finite.

        Args:
            embeddings: :math:`(B, D)`.
            labels: :math:`(B)`.
        """
        with self._lock:
            self._check_buffers()
            self._check_settings()
            self._check_batch(embeddings, labels)
            # The buffers must stay ordinary tensors whatever the caller's
            # mode: an inference tensor could not be updated in place by a
            # later training step.
            with torch.inference_mode(False), torch.no_grad():
                self._store(embeddings.detach(), labels)

    def _store(self, embeddings: Tensor, labels: Tensor) -> None:
        if self.memory_embeddings is not None:
            # In the memory's dtype first: a row can overflow in the cast.
            embeddings = embeddings.to(self.memory_embeddings.dtype)
        finite = torch.isfinite(embeddings).all(dim=1)
        if not bool(finite.all()):
            embeddings, labels = embeddings[finite], labels[finite.to(labels.device)]
        if self.memory_labels is None:
            self._allocate(embeddings, labels)
        batch = embeddings.shape[0]
        if batch >= self.memory_size:
            # Only the newest memory_size entries survive.
            self.memory_embeddings.copy_(embeddings[batch - self.memory_size :])
            self.memory_labels.copy_(labels[batch - self.memory_size :])
            self._next, self._count = 0, self.memory_size
            self._enqueued += batch
            return
        end = self._next + batch
        first = min(end, self.memory_size) - self._next
        self.memory_embeddings[self._next : self._next + first] = embeddings[:first]
        self.memory_labels[self._next : self._next + first] = labels[:first]
        if first < batch:  # wraps around
            self.memory_embeddings[: batch - first] = embeddings[first:]
            self.memory_labels[: batch - first] = labels[first:]
        self._next = end % self.memory_size
        self._count = min(self._count + batch, self.memory_size)
        self._enqueued += batch

    def _allocate(self, embeddings: Tensor, labels: Tensor) -> None:
        # Both buffers before either is kept: a failure leaves the memory as it was.
        stored = self.memory_embeddings
        if stored is None:
            width = embeddings.shape[1]
            _check_capacity(self.memory_size, width, embeddings.element_size(), "memory_size")
            stored = _allocated(lambda: embeddings.new_zeros(self.memory_size, width),
                                embeddings.device, self.memory_size, width,
                                embeddings.element_size(), "memory_size")
        memory_labels = _allocated(
            lambda: labels.new_zeros(self.memory_size, device=stored.device), stored.device,
            self.memory_size, 1, labels.element_size(), "memory_size")
        self.embedding_dim = stored.shape[1]
        self.memory_embeddings, self.memory_labels = stored, memory_labels
        self._own_buffers()

    def _device_problem(self, embeddings: Tensor) -> Optional[ValueError]:
        memory = self.memory_embeddings
        if memory is not None and embeddings.device != memory.device:
            return ValueError(
                f"embeddings: must be on the memory's device ({memory.device}), got {embeddings.device}"
            )
        return None

    def _check_batch(self, embeddings: Tensor, labels: Tensor) -> None:
        check_tensor("embeddings", embeddings)
        # The dtype refused here, not only by the loss: enqueue stores labels
        # without one, and labels of a dtype the losses refuse would fix the
        # memory's label dtype (reset keeps it) to one no later batch can match.
        check_labels("labels", labels)
        if embeddings.dim() != 2 or not embeddings.is_floating_point():
            raise ValueError(
                "embeddings: must be a 2-D floating point tensor, got shape "
                f"{tuple(embeddings.shape)} and dtype {embeddings.dtype}"
            )
        if embeddings.shape[1] == 0:
            # A memory of rows without columns (embedding_dim=0) is none.
            raise ValueError(
                f"embeddings: must have at least one column, got shape {tuple(embeddings.shape)}"
            )
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(
                f"labels: must have shape ({embeddings.shape[0]},) to match embeddings, "
                f"got {tuple(labels.shape)}"
            )
        if self.embedding_dim is not None and embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"embeddings: must have {self.embedding_dim} columns like the memory, "
                f"got shape {tuple(embeddings.shape)}"
            )
        problem = self._device_problem(embeddings)
        if problem is not None:
            raise problem
        if self.memory_labels is not None and labels.dtype != self.memory_labels.dtype:
            raise ValueError(
                f"labels: must keep the dtype of the first batch's ({self.memory_labels.dtype}), "
                f"got {labels.dtype}"
            )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,  # type: ignore[override]
                              missing_keys, unexpected_keys, error_msgs):
        self._check_settings()
        extra = state_dict.get(prefix + "_extra_state")
        self._check_saved(
            state_dict.get(prefix + "memory_embeddings"),
            state_dict.get(prefix + "memory_labels"),
            extra,
            local_metadata.get("assign_to_params_buffers", False),
        )
        # An embeddings buffer this memory has and the state lacks (the state
        # of a memory that never stored anything, and had no embedding_dim,
        # has none) is a missing key, which torch reports and a lenient load
        # keeps; embedding_dim then stays its width.
        kept = self.memory_embeddings is not None and prefix + "memory_embeddings" not in state_dict
        # The buffers are allocated lazily; take their shape from the saved
        # state. Loading copies into existing buffers: the embeddings keep
        # the dtype the module was cast to (``.double()``), as a Module's
        # parameters do; the labels, whose dtype is the data's and which
        # casts leave alone, take the saved one (an int32 buffer that an
        # earlier batch made would turn 2**31 + 5 into -2**31 + 5).
        for name in ("memory_embeddings", "memory_labels"):
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if not isinstance(saved, Tensor):
                continue
            if current is None:
                setattr(self, name, torch.empty_like(saved))
            elif name == "memory_labels" and current.dtype != saved.dtype:
                setattr(self, name, torch.empty(saved.shape, dtype=saved.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.memory_embeddings is not None and (kept or self.embedding_dim is None):
            # Also after a lenient load of buffers without the extra state
            # into a memory that had none: the width they were saved with.
            self.embedding_dim = self.memory_embeddings.shape[1]
        self._own_buffers()  # ``assign=True`` puts the saved tensors in place

    def _check_saved(self, embeddings: object, labels: object, extra: object, assign: bool) -> None:
        """Refuses the state of another memory, or one whose ring position and
        count no memory of this size can reach, or whose stored rows would
        hold a NaN or Inf once loaded, before anything is loaded."""
        size = self.memory_size

        def refuse(why: str) -> None:
            raise ValueError(f"state_dict: not the state of a CrossBatchMemory with memory_size={size}"
                             f"{'' if self.embedding_dim is None else f' and embedding_dim={self.embedding_dim}'}: {why}")

        if embeddings is not None:
            if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or embeddings.shape[0] != size:
                refuse(f"memory_embeddings has shape {tuple(getattr(embeddings, 'shape', ()))}, "
                       f"expected ({size}, D)")
            if self.embedding_dim is not None and embeddings.shape[1] != self.embedding_dim:
                refuse(f"memory_embeddings has {embeddings.shape[1]} columns")
            if embeddings.shape[1] == 0:
                refuse("memory_embeddings has no columns")
            if not embeddings.is_floating_point():
                refuse(f"memory_embeddings has dtype {embeddings.dtype}, not a floating point one")
        if labels is not None and (not isinstance(labels, Tensor) or tuple(labels.shape) != (size,)):
            refuse(f"memory_labels has shape {tuple(getattr(labels, 'shape', ()))}, expected ({size},)")
        if labels is not None and embeddings is None:
            refuse("it has memory_labels without memory_embeddings")
        if isinstance(labels, Tensor) and labels.dtype not in LABEL_DTYPES:
            refuse(f"memory_labels has dtype {labels.dtype}, which no loss takes as labels")
        if extra is None:
            # Without its extra state (a lenient load, or a strict one that
            # torch fails only after copying) the memory keeps its count.
            self._check_finite(embeddings, self._count, assign, refuse)
            return
        if not isinstance(extra, dict) or not {"next", "count", "embedding_dim"} <= set(extra):
            refuse(f"its extra state {extra!r} lacks next, count and embedding_dim")
        try:
            count = check_int("count", extra["count"], 0, size)
            position = check_int("next", extra["next"], 0, size - 1)
            dim = extra["embedding_dim"]
            if dim is not None:
                dim = check_int("embedding_dim", dim, 1, INT64_MAX)
            if "enqueued" in extra:
                enqueued = check_int("enqueued", extra["enqueued"], count, INT64_MAX)
                if count < size and enqueued != count:
                    refuse(f"enqueued={enqueued} with count={count}: a memory that is not full "
                           "has stored each of its entries once")
        except ValueError as err:
            refuse(str(err))
        self._check_finite(embeddings, count, assign, refuse)
        if count < size and position != count:
            refuse(f"next={position} with count={count}: a memory that is not full has its "
                   "next entry right after its last")
        if count > 0 and (embeddings is None or labels is None):
            refuse(f"count={count} but the buffers are missing")
        if embeddings is not None and dim is not None and embeddings.shape[1] != dim:
            refuse(f"embedding_dim={dim} but memory_embeddings has {embeddings.shape[1]} columns")

    def _check_finite(self, embeddings: object, count: int, assign: bool,
                      refuse: Callable[[str], None]) -> None:
        """Refuses stored rows (the first ``count``) that hold a NaN or Inf in
        the dtype they are loaded into: the memory's own, which a finite
        float64 row can overflow (1e5 in float16), unless ``assign`` keeps
        the saved tensor."""
        if not isinstance(embeddings, Tensor) or count == 0:
            return
        stored = embeddings[:count]
        memory = self.memory_embeddings
        if memory is not None and not assign:
            stored = stored.to(memory.dtype)
        if not bool(torch.isfinite(stored).all()):
            cast = "" if stored.dtype == embeddings.dtype else f" once cast to the memory's {stored.dtype}"
            refuse(f"its stored embeddings hold NaN or Inf{cast}, which would make every later loss NaN")

    def get_extra_state(self) -> Dict[str, Any]:
        self._check_settings()
        return {"next": self._next, "count": self._count, "embedding_dim": self.embedding_dim,
                "enqueued": self._enqueued}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self._next = int(state["next"])
        self._count = int(state["count"])
        # States saved before the count was kept: as if loaded on every rank.
        self._enqueued = int(state.get("enqueued", self._count))
        self.embedding_dim = state["embedding_dim"]


def _positive_int(name: str, value: object) -> int:
    return check_int(name, value, 1)


def _check_loss(loss: object) -> _TripletModule:
    if not isinstance(loss, (_TripletLoss, DistributedTripletLoss)):
        raise ValueError(
            "loss: must be a BatchAllTripletLoss, BatchHardTripletLoss, "
            f"BatchSemiHardTripletLoss or DistributedTripletLoss, got {loss!r}"
        )
    return loss


def _allocated(make: Callable[[], Tensor], device: torch.device, memory_size: int, width: int,
               item_size: int, names: str) -> Tensor:
    """``make()``, a buffer of the memory on ``device``. Where the host cannot
    hold it, the error names the arguments ``names`` that set its size
    (torch's allocator names no argument). Every other device's errors are
    kept: a CUDA out-of-memory error says what is free, and a RuntimeError
    there may be an earlier kernel's failure, reported at this call, that no
    size would mend."""
    try:
        return make()
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:
        if device.type != "cpu":
            raise
        raise HostOutOfMemoryError(
            f"{names}: {memory_size} rows of {width} elements of {item_size} bytes "
            f"({memory_size * width * item_size / 2**30:.3g} GiB) could not be allocated"
        ) from err


def _check_capacity(memory_size: int, width: int, item_size: int, names: str) -> None:
    """A memory whose size in bytes torch can count (int64), and whose labels'
    too; beyond, torch's error ("Storage size calculation overflowed") would
    not name the arguments ``names`` that set its size."""
    if max(memory_size * width * item_size, memory_size * 8) > 2**63 - 1:
        raise ValueError(
            f"{names}: {memory_size} rows of {width} elements of {item_size} bytes are more "
            "than a tensor can hold"
        )
