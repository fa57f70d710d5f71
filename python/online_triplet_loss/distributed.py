r"""Exact triplet mining across the processes of a distributed job.

:class:`DistributedTripletLoss` wraps one of the loss modules. Every rank
gathers the embeddings and labels of all ranks and mines its own anchors
against that global batch, so one step on :math:`N` ranks is the step that a
single process would take on the concatenated batch: the same loss on every
rank and, once :class:`~torch.nn.parallel.DistributedDataParallel` has
averaged the gradients, the same parameter update.

Only ``all_gather`` and ``all_reduce`` are used, so gloo and nccl both work.
"""

from __future__ import annotations

import struct
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _core, _native as native
from ._validation import (
    DISTANCES,
    check_distance,
    check_flag,
    check_label_dtype,
    check_labels,
    check_tensor,
    margin_and_tensor,
    refuse_scripting,
)
from .losses import _has_tangent, _TripletLoss, loss_and_fraction, terms

__all__ = ["DistributedTripletLoss"]

_MININGS = ("all", "hard", "semihard")


# Every dtype torch names, in a fixed order: its index is the dtype's code
# in the exchange below (the same on every rank with the same torch).
_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)


# Label dtypes gloo cannot gather, and the dtype each travels in.
_CARRIERS = {torch.bool: torch.uint8, torch.int16: torch.int32}


# A setting every rank of the group must share: what it is, its value as an
# int, and how to show such an int in a message.
Setting = Tuple[str, int, Callable[[int], object]]

# Places for the settings in the exchange (a fixed length on every rank).
_SETTINGS = 16


def _dtype_code(dtype: Optional[torch.dtype]) -> int:
    return -1 if dtype is None else _DTYPES.index(dtype)


def _dtype_shown(code: int) -> object:
    return None if code < 0 else _DTYPES[code]


def _float_code(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _float_shown(code: int) -> float:
    return struct.unpack("<d", struct.pack("<q", code))[0]


# What a rank's own problem is about, told to the other ranks as a code.
_PROBLEMS = ("embeddings", "labels", "extra_embeddings", "extra_labels",
             "extra_embeddings and extra_labels", "margin", "distance", "soft", "loss")


def _problem_code(problem: Optional[ValueError]) -> int:
    """0 for no problem, else 1 + the argument the problem names in
    :data:`_PROBLEMS` (or one past them)."""
    if problem is None:
        return 0
    name = str(problem).split(":", 1)[0]
    return _PROBLEMS.index(name) + 1 if name in _PROBLEMS else len(_PROBLEMS) + 1


def _gather_sizes(embeddings: Tensor, labels: Tensor, group: Optional[object],
                  problem: Optional[ValueError] = None,
                  settings: Sequence[Setting] = ()) -> List[int]:
    """Every rank's batch size, as Python ints, after checking that every rank
    passes embeddings of the same width and dtype, and labels of the same
    dtype: a gather of mismatched tensors would abort the process inside the
    backend. Every rank's embeddings must also require grad, or none, since
    the gather's backward is a collective, and every rank must give the same
    ``settings`` (the loss's, a memory's state), or the ranks would compute
    different things, or call different collectives. A rank's own
    ``problem`` (shapes that do not match, a bad setting) is raised there,
    and makes the other ranks raise too, instead of waiting in a collective.
    ``tolist`` is the one host synchronisation of the loss: padding needs the
    sizes on the host."""
    if len(settings) > _SETTINGS:
        raise RuntimeError(f"internal error: {len(settings)} settings to exchange")
    differentiable = int(torch.is_grad_enabled() and embeddings.requires_grad)
    size, width = tuple(embeddings.shape) if problem is None else (0, 0)
    codes = [code for _, code, _ in settings] if problem is None else []
    mine = [size, width, _DTYPES.index(embeddings.dtype),
            _DTYPES.index(labels.dtype), differentiable, _problem_code(problem)]
    mine += codes + [0] * (_SETTINGS - len(codes))
    shape = torch.tensor(mine, dtype=torch.int64, device=embeddings.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shapes, shape, group=group)
    rows = torch.stack(shapes).tolist()
    if problem is not None:
        raise problem
    others = [(r, row[5]) for r, row in enumerate(rows) if row[5]]
    if others:
        rank, code = others[0]
        name = _PROBLEMS[code - 1] if code <= len(_PROBLEMS) else "arguments"
        raise ValueError(
            f"{name}: rank {rank} of the group raised a ValueError for its {name} (the error "
            "there says how); every rank stops here"
        )
    for column, name, what in ((1, "embeddings", "width"), (2, "embeddings", "dtype"),
                               (3, "labels", "dtype"),
                               (4, "embeddings", "requires_grad (under grad mode)")):
        values = [row[column] for row in rows]
        if len(set(values)) > 1:
            shown = {1: values, 4: [bool(v) for v in values]}.get(column) or [_DTYPES[v] for v in values]
            per_rank = ", ".join(f"{v} on rank {r}" for r, v in enumerate(shown))
            raise ValueError(
                f"{name}: every rank of the group must pass the same {what}; got {per_rank}"
            )
    for place, (what, _, show) in enumerate(settings, start=6):
        values = [row[place] for row in rows]
        if len(set(values)) > 1:
            per_rank = ", ".join(f"{show(v)!r} on rank {r}" for r, v in enumerate(values))
            raise ValueError(f"{what}: must be the same on every rank of the group; got {per_rank}")
    check_label_dtype("labels", labels)  # the same dtype on every rank
    return [row[0] for row in rows]


def _tensor_problem(name: str, value: object) -> Optional[ValueError]:
    """Why ``value`` cannot take part in the exchange (no dense CPU or CUDA
    tensor), if it cannot."""
    try:
        check_tensor(name, value)
    except ValueError as exc:
        return exc
    return None


def _exchange_device(group: Optional[object]) -> torch.device:
    """Where a rank with a problem puts its part of the exchange, which its
    own tensors may not be able to carry (a list, or CPU embeddings under
    nccl): the current CUDA device where the group's backend includes nccl
    (whose ranks pass embeddings there), else the CPU (gloo takes tensors of
    either device on each rank)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_EMBEDDING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape_problem(embeddings: Tensor, labels: Tensor) -> Optional[ValueError]:
    # The core's own check, made before the exchange, whose gather of a dtype
    # gloo cannot carry (float8, uint16) would fail on its own.
    if embeddings.dtype not in _EMBEDDING_DTYPES:
        return ValueError(
            "embeddings: must be floating point (float16, bfloat16, float32 or float64), "
            f"got dtype {str(embeddings.dtype).removeprefix('torch.')}"
        )
    if embeddings.dim() != 2:
        return ValueError(
            f"embeddings: must be 2-D (batch, dim), got shape {tuple(embeddings.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        return ValueError(
            f"labels: must be 1-D with one entry per row of embeddings ({embeddings.shape[0]}), "
            f"got shape {tuple(labels.shape)}"
        )
    return None


def _check_loss(loss: object) -> "_TripletLoss":
    if not isinstance(loss, _TripletLoss):
        names = "BatchAllTripletLoss, BatchHardTripletLoss, BatchSemiHardTripletLoss"
        raise ValueError(f"loss: expected one of {names}, got {type(loss).__name__}")
    return loss


def _gather_rows(x: Tensor, sizes: List[int], group: Optional[object]) -> Tensor:
    """Concatenates every rank's ``x`` (rows ``sizes[r]`` on rank ``r``): pads to the
    largest size, gathers and cuts the padding off again."""
    longest = max(sizes)
    x = x.contiguous()
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros((longest - x.shape[0],) + tuple(x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x, group=group)
    return torch.cat([part[:rows] for part, rows in zip(parts, sizes)])


def _check_extra(embeddings: object, extra_embeddings: object, extra_labels: object) -> None:
    check_tensor("extra_embeddings", extra_embeddings)
    check_labels("extra_labels", extra_labels)
    width = embeddings.shape[1] if isinstance(embeddings, Tensor) and embeddings.dim() == 2 else None
    if extra_embeddings.dtype not in _EMBEDDING_DTYPES:
        raise ValueError(
            "extra_embeddings: must be floating point (float16, bfloat16, float32 or float64), "
            f"got dtype {extra_embeddings.dtype}"
        )
    if extra_embeddings.dim() != 2 or (width is not None and extra_embeddings.shape[1] != width):
        raise ValueError(
            f"extra_embeddings: must be 2-D with {width if width is not None else 'D'} columns "
            f"like embeddings, got shape {tuple(extra_embeddings.shape)}"
        )
    if extra_labels.dim() != 1 or extra_labels.shape[0] != extra_embeddings.shape[0]:
        raise ValueError(
            "extra_labels: must be 1-D with one entry per row of extra_embeddings "
            f"({extra_embeddings.shape[0]}), got shape {tuple(extra_labels.shape)}"
        )


def _common_labels(labels: Tensor, extra: Tensor) -> Tuple[Tensor, Tensor]:
    """``labels`` and ``extra`` in dtypes that keep every class: integer and
    float labels meet in float64, where an integer and a float of the same
    value are one class, instead of a float being truncated to an integer."""
    # Checked here, before they are concatenated into the core's ref_labels.
    check_label_dtype("labels", labels)
    check_label_dtype("extra_labels", extra)
    extra = extra.to(labels.device)
    if labels.dtype != extra.dtype and (labels.is_floating_point() or extra.is_floating_point()):
        for name, t in (("labels", labels), ("extra_labels", extra)):
            # float64 tells integers apart only up to 2**53 (the core refuses
            # the same mix; here the two are concatenated first).
            if t.dtype == torch.int64 and t.numel() and bool(((t > 2**53) | (t < -(2**53))).any()):
                raise ValueError(
                    f"{name}: holds integers beyond ±2**53, which cannot be compared exactly "
                    "with floating-point labels; give both the same integer dtype")
        return labels.double(), extra.double()
    return labels, extra


class _GatherRows(torch.autograd.Function):
    """All-gather whose backward sums the gradient of the whole gathered tensor
    over the ranks and hands each rank the rows it contributed (what
    reduce_scatter does; gloo has no reduce_scatter, so this uses all_reduce)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, sizes: List[int], offset: int, group: Optional[object]
    ) -> Tensor:
        ctx.rows = (offset, x.shape[0])
        ctx.group = group
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        summed = grad.detach().contiguous().clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=ctx.group)
        offset, rows = ctx.rows
        mine = summed[offset:offset + rows]
        if torch.is_grad_enabled():  # create_graph=True: a second derivative may follow
            mine = _NoSecondDerivative.apply(mine, grad)
        return mine, None, None, None


class _NoSecondDerivative(torch.autograd.Function):
    """Passes a first derivative made by an all-reduce through, attached to
    the gradient it came from; differentiating it raises: the all-reduce is
    no autograd operation, so its own derivative would be wrong."""

    @staticmethod
    def forward(ctx, mine: Tensor, source: Tensor) -> Tensor:  # type: ignore[override]
        return mine.clone()

    @staticmethod
    def backward(ctx, *_):  # type: ignore[override]
        raise RuntimeError(
            "DistributedTripletLoss: second derivatives (double backward, gradient penalties) "
            "are not supported across ranks: the gather's all-reduce is not differentiable. "
            "batch_hard_triplet_loss supports them in a single process."
        )


class _SharedGradient(torch.autograd.Function):
    """The identity, whose backward averages the gradient over the ranks. A
    learnable margin lives in the loss, outside the model DDP averages: each
    rank's gradient is its share of the loss's, scaled by the world size as
    the embeddings' are, and the average is the single-process gradient, the
    same on every rank."""

    @staticmethod
    def forward(ctx, x: Tensor, world: int, group: Optional[object],  # type: ignore[override]
                device: torch.device) -> Tensor:
        ctx.world, ctx.group, ctx.device = world, group, device
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # Reduced on the embeddings' device, which the group's backend
        # serves (NCCL has no CPU tensors), and brought back to the margin's.
        summed = grad.detach().to(ctx.device).contiguous().clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=ctx.group)
        mean = (summed / ctx.world).to(grad.device)
        if torch.is_grad_enabled():  # create_graph=True: a second derivative may follow
            mean = _NoSecondDerivative.apply(mean, grad)
        return mean, None, None, None


class _GlobalMean(torch.autograd.Function):
    """``value``, the global loss, with the gradient that this rank's
    ``sum_ · world / max(count, 1)`` would give ``sum_`` (``scale`` being
    ``world / max(count, 1)``, float64): that product is not computed, since
    it overflows where the loss does not, and an infinite one would make the
    loss NaN on this rank alone."""

    @staticmethod
    def forward(ctx, value: Tensor, sum_: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(scale)
        # A copy: a view of an input made here could not be changed in place
        # (`loss /= steps`) once it requires grad.
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return None, grad.to(scale.dtype) * scale, None


class DistributedTripletLoss(nn.Module):
    r"""Mines triplets over the batches of all ranks, exactly.

    Each rank passes its own batch. ``forward`` gathers the embeddings and
    labels of every rank (batch sizes may differ between ranks), mines this
    rank's anchors against the global batch (an anchor is never its own
    positive) and all-reduces the loss terms. It returns the loss of the
    concatenated batch, the same value on every rank. Its gradient is scaled
    for :class:`~torch.nn.parallel.DistributedDataParallel`, which averages
    gradients over the ranks: after that average every parameter has the
    gradient of the single-process loss on the concatenated batch. The gather
    is differentiable, so gradients reach the rank that computed each
    embedding.

    Without an initialised process group, or with a group of one rank, it is
    the wrapped loss; extra references (see :meth:`forward`) keep their
    meaning there, so code written for several ranks, e.g. a
    :class:`~online_triplet_loss.CrossBatchMemory` around this module, also
    runs in a single process.

    Every rank of the group must call ``forward`` (and ``backward``) together,
    with embeddings of the same width and dtype, labels of the same dtype,
    the same settings of the wrapped loss and extra references of the same
    shape and dtypes (otherwise every rank raises a ``ValueError`` saying
    what differs); the group should be the one DDP averages over. The batch
    sizes are gathered to the host (one small synchronisation per call,
    needed to pad the gather); nothing else waits for the device. With nccl,
    pass embeddings on the current CUDA device.

    Args:
        loss: a :class:`~online_triplet_loss.BatchAllTripletLoss`,
            :class:`~online_triplet_loss.BatchHardTripletLoss` or
            :class:`~online_triplet_loss.BatchSemiHardTripletLoss`. Its
            ``margin``, ``distance`` and ``soft`` are read at every call.
        group: the process group; ``None`` is the default group.

    Attributes:
        last_fraction: batch-all only, the global fraction of valid triplets with
            a positive loss from the last call on more than one rank or with
            extra references (a detached tensor); ``None`` for the other
            minings and before the first such call.

    Example (one process per rank, e.g. under ``torchrun``; not run as a doctest)::

        model = DistributedDataParallel(net)
        criterion = DistributedTripletLoss(BatchHardTripletLoss(margin=0.2))
        loss = criterion(model(images), labels)  # this rank's batch
        loss.backward()
    """

    def __init__(self, loss: nn.Module, *, group: Optional[object] = None) -> None:
        super().__init__()
        _check_loss(loss)
        self.loss = loss
        self.group = group
        self.last_fraction: Optional[Tensor] = None

    @property
    def mining(self) -> str:
        """The wrapped loss's mining: ``"all"``, ``"hard"`` or ``"semihard"``.
        A loss put in place of ``loss`` is checked at the next call."""
        return _check_loss(self.loss).mining

    def extra_repr(self) -> str:
        return f"mining={getattr(self.loss, 'mining', None)!r}"

    def __prepare_scriptable__(self) -> "DistributedTripletLoss":
        refuse_scripting(type(self).__name__)
        return self

    def _world(self) -> Tuple[int, int]:
        """``(rank, world_size)`` in the group, or ``(0, 1)`` without one."""
        if not (dist.is_available() and dist.is_initialized()):
            return 0, 1
        world = dist.get_world_size(self.group)
        rank = dist.get_rank(self.group)
        if rank < 0:
            raise ValueError("group: this process is not a member of the group")
        return rank, world

    def _settings(self, embeddings: object, labels: object, extra_embeddings: Optional[Tensor],
                  extra_labels: Optional[Tensor]) -> List[Setting]:
        """What every rank must share for the loss of the global batch to be
        one loss: the wrapped loss's settings, and the extra references'
        presence, shape and dtypes (not their values). Raises the
        ``ValueError`` of a bad margin or of bad extra references, also of
        labels that cannot meet the extra labels (integers beyond 2**53 with
        float labels: a check of this rank's values, made before the
        exchange so that the other ranks raise too)."""
        loss = _check_loss(self.loss)
        margin, learnable = margin_and_tensor(loss.margin)
        if isinstance(loss.margin, Tensor) and _has_tangent(loss.margin):
            # Each rank's tangent would be its own part of the global loss's
            # (nothing sums tangents across ranks as backward sums gradients).
            raise ValueError(
                "loss.margin: a forward-mode AD dual tensor (torch.autograd.forward_ad) cannot "
                "be combined across ranks; use reverse mode (backward)"
            )
        settings: List[Setting] = [
            ("loss.mining", _MININGS.index(loss.mining), lambda v: _MININGS[v]),
            ("loss.distance", DISTANCES.index(check_distance(loss.distance)),
             lambda v: DISTANCES[v]),
            ("loss.soft", int(check_flag("soft", loss.soft)), bool),
            # + 0.0: -0.0 is the margin 0.0.
            ("loss.margin", _float_code(margin + 0.0), _float_shown),
            # Its gradient is all-reduced in backward: present, in one dtype.
            ("loss.margin (learnable, its dtype)",
             _dtype_code(None if learnable is None else learnable.dtype), _dtype_shown),
        ]
        if (extra_embeddings is None) != (extra_labels is None):
            raise ValueError("extra_embeddings and extra_labels: must be given together")
        if extra_embeddings is not None:
            _check_extra(embeddings, extra_embeddings, extra_labels)
            if _tensor_problem("labels", labels) is None:
                _common_labels(labels, extra_labels)
        rows, width = (-1, -1) if extra_embeddings is None else tuple(extra_embeddings.shape)
        settings += [
            ("extra_embeddings (rows)", rows, lambda v: None if v < 0 else v),
            ("extra_embeddings (columns)", width, lambda v: None if v < 0 else v),
            ("extra_embeddings (dtype)",
             _dtype_code(None if extra_embeddings is None else extra_embeddings.dtype),
             _dtype_shown),
            ("extra_labels (dtype)",
             _dtype_code(None if extra_labels is None else extra_labels.dtype), _dtype_shown),
        ]
        return settings

    def _single_process(
        self, embeddings: Tensor, labels: Tensor, extra_embeddings: Tensor, extra_labels: Tensor
    ) -> Tensor:
        """The loss of this batch with the extra references appended after it:
        anchor ``i`` is reference ``i``, as on several ranks with offset 0."""
        problem = (_tensor_problem("embeddings", embeddings) or _tensor_problem("labels", labels)
                   or _shape_problem(embeddings, labels))
        if problem is not None:  # the core's checks, before the batch meets the extras
            raise problem
        labels, extra_labels = _common_labels(labels, extra_labels)
        ref_labels = torch.cat([labels, extra_labels])
        loss = _check_loss(self.loss)
        value, fraction = loss_and_fraction(
            loss.mining, labels, embeddings, loss.margin,
            distance=check_distance(loss.distance), soft=loss.soft,
            ref_embeddings=(embeddings, extra_embeddings.detach().to(embeddings.device)),
            ref_labels=ref_labels, anchor_offset=0,
        )
        if loss.mining == "all":
            self.last_fraction = fraction.detach()
        return value

    def gather(self, embeddings: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor, int]:
        """The global batch, concatenated in rank order.

        The embeddings are differentiable; their backward all-reduces, so every
        rank must run it (or call this under :func:`torch.no_grad`, e.g. to
        fill a memory with the global batch). Without a process group, or
        with a group of one rank, the batch itself is the global batch.

        Args:
            embeddings: this rank's embeddings, :math:`(B_r, D)`.
            labels: their labels, :math:`(B_r)`.

        Returns:
            ``(embeddings, labels, offset)``: the global batch, :math:`(B, D)` and
            :math:`(B)`, where rows ``offset:offset + B_r`` are this rank's;
            ``(embeddings, labels, 0)`` without a group of several ranks.
        """
        return self._gather(embeddings, labels)

    def _gather(self, embeddings: Tensor, labels: Tensor, problem: Optional[ValueError] = None,
                settings: Sequence[Setting] = ()) -> Tuple[Tensor, Tensor, int]:
        """:meth:`gather`, exchanging this rank's ``problem`` (raised on every
        rank) and ``settings`` (that must be the same on every rank) with the
        sizes."""
        if problem is None:
            problem = (_tensor_problem("embeddings", embeddings) or _tensor_problem("labels", labels)
                       or _shape_problem(embeddings, labels))
        rank, world = self._world()
        if world == 1:
            if problem is not None:
                raise problem
            return embeddings, labels, 0
        if problem is None and _has_tangent(embeddings):
            # The gather has no forward derivative: this rank would raise
            # after the exchange, leaving the others in the gather.
            problem = ValueError(
                "embeddings: a forward-mode AD dual tensor (torch.autograd.forward_ad) cannot "
                "be gathered across ranks; use reverse mode (backward)"
            )
        if problem is None:
            labels = labels.to(embeddings.device)
        else:
            # Raised after the exchange, on every rank.
            device = _exchange_device(self.group)
            embeddings = torch.zeros(0, 0, device=device)
            labels = torch.zeros(0, dtype=torch.int64, device=device)
        sizes = _gather_sizes(embeddings, labels, self.group, problem, settings)
        offset = sum(sizes[:rank])
        carrier = _CARRIERS.get(labels.dtype, labels.dtype)
        all_labels = _gather_rows(labels.to(carrier), sizes, self.group).to(labels.dtype)
        all_embeddings = _GatherRows.apply(embeddings, sizes, offset, self.group)
        return all_embeddings, all_labels, offset

    @native.boundary
    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        *,
        extra_embeddings: Optional[Tensor] = None,
        extra_labels: Optional[Tensor] = None,
    ) -> Tensor:
        r"""The loss of the global batch.

        Args:
            embeddings: this rank's embeddings, :math:`(B_r, D)`.
            labels: their labels, :math:`(B_r)`.
            extra_embeddings: optional further references, :math:`(M, D)`, e.g.
                a cross-batch memory, appended after the global batch as
                positives and negatives (never as anchors). They are constants
                (no gradient) and should be the same on every rank: their
                shape and dtypes are compared, their values are not (that
                would read them all). Extras that differ in value make each
                rank mine its anchors against its own, and the loss is then
                the mean of those terms over the global count, not the loss
                of one process. Without a
                group of several ranks they mean the same, the global batch
                being this batch.
            extra_labels: their labels, :math:`(M)`; given together with
                ``extra_embeddings``.

        Returns:
            The loss of the global batch mined against itself and the extra
            references: a scalar in the dtype of ``embeddings`` (float32 for
            float16 and bfloat16 ones under autocast), the same on every rank.
        """
        # Cast for autocast before the extras take the embeddings' dtype.
        embeddings, extra_embeddings = native.autocast_inputs(embeddings, extra_embeddings)
        rank, world = self._world()
        if world == 1:
            if (extra_embeddings is None) != (extra_labels is None):
                raise ValueError("extra_embeddings and extra_labels: must be given together")
            if extra_embeddings is None:
                return _check_loss(self.loss)(embeddings, labels)
            _check_extra(embeddings, extra_embeddings, extra_labels)
            return self._single_process(embeddings, labels, extra_embeddings, extra_labels)

        # What would fail on this rank alone fails on every rank, in the
        # exchange of the sizes, before any rank waits in another collective.
        problem, settings = None, []
        try:
            settings = self._settings(embeddings, labels, extra_embeddings, extra_labels)
        except ValueError as exc:
            problem = exc
        all_embeddings, all_labels, offset = self._gather(embeddings, labels, problem, settings)
        # The anchors are rows of the gathered tensor, not the input: all the
        # gradient of this rank's rows, as anchors here and as references on
        # every rank, then takes one path, the gather's all-reduce, and each
        # contribution is counted once. (Anchoring on the input would be exact
        # too: the anchor part would then bypass the all-reduce.)
        # The extra references follow the global batch, in parts: the core
        # computes no gradient for them.
        ref_embeddings, ref_labels = all_embeddings, all_labels
        if extra_embeddings is not None:
            # On the batch's device, in their own dtype: the loss casts
            # references to the one it computes in (float32 for a half batch).
            ref_embeddings = (all_embeddings, extra_embeddings.detach().to(all_embeddings.device))
            all_labels, extra_labels = _common_labels(all_labels, extra_labels)
            ref_labels = torch.cat([all_labels, extra_labels])
        anchors = all_embeddings[offset:offset + embeddings.shape[0]]
        anchor_labels = all_labels[offset:offset + embeddings.shape[0]]

        loss = _check_loss(self.loss)
        margin = loss.margin
        if isinstance(margin, Tensor) and margin.requires_grad:
            margin = _SharedGradient.apply(margin, world, self.group, embeddings.device)
        sum_, count, valid = terms(
            loss.mining, anchor_labels, anchors, margin,
            distance=check_distance(loss.distance), soft=loss.soft,
            ref_embeddings=ref_embeddings, ref_labels=ref_labels, anchor_offset=offset,
        )
        # One all-reduce for the three terms; float64 holds counts up to 2**53 exactly.
        totals = torch.stack([sum_.detach().double(), count.double(), valid.double()])
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=self.group)
        # The core's loss and fraction of the global terms (the fraction NaN
        # whenever the loss is), in the embeddings' dtype, as in one process.
        value, fraction = native.call(_core.mean_and_fraction, totals[0], totals[1].long(),
                                      totals[2].long(), embeddings)
        if loss.mining == "all":
            self.last_fraction = fraction.detach()
        # DDP divides the summed gradients by the world size; scaling by it here
        # makes the average the gradient of sum_over_ranks(sum_) / max(count, 1),
        # the core's mean of this rank's terms over the global count.
        scale = world / totals[1].clamp_min(1)
        return _GlobalMean.apply(value.to(embeddings.dtype), sum_, scale)
