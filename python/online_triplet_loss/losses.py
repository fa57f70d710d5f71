r"""Triplet losses with online mining.

A valid triplet :math:`(a, p, n)` has :math:`a \ne p`, :math:`y_a = y_p` and
:math:`y_n \ne y_a`; :math:`d` is the distance and :math:`m` the margin.

The functions keep the signatures of online_triplet_loss 0.0.6, so
``from online_triplet_loss.losses import *`` keeps working. The modules follow
``torch.nn``: keyword-only settings and ``forward(embeddings, labels)``.

First derivatives are exact for all three losses. Second derivatives
(``create_graph=True`` then a gradient of the gradient, Hessians, gradient
penalties) are exact through batch-hard; through batch-all and semi-hard they
raise a ``RuntimeError`` (0.0.6 computed them; here the mining's gradient is
first-order only). The mining runs in native code, so the losses cannot be
captured: ``torch.jit.trace`` and ``torch.export`` of code that calls them,
and ``torch.jit.script`` of the modules, raise a ``RuntimeError``, as do
``torch.func`` transforms (``vmap``, ``grad``). Trace, script or export the
model alone and call the loss in Python. Between chunks of anchors (a batch of
more than a few thousand has several) the losses run Python's signal handlers,
so Ctrl-C stops a long loss there with ``KeyboardInterrupt``; a handler runs
there as inside any ``torch.no_grad()`` block, with autocast off too.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.utils import parametrize

from . import _core, _native as native
from ._validation import (
    check_anchor_offset,
    check_distance,
    check_flag,
    check_labels,
    check_margin,
    check_tensor,
    margin_and_tensor,
    reference_parts,
    refuse_scripting,
    refuse_tracing,
    resolve_distance,
)

__all__ = [
    "batch_all_triplet_loss",
    "batch_hard_triplet_loss",
    "batch_semihard_triplet_loss",
    "BatchAllTripletLoss",
    "BatchHardTripletLoss",
    "BatchSemiHardTripletLoss",
]

_NAMES = {
    "all": "batch_all_triplet_loss",
    "hard": "batch_hard_triplet_loss",
    "semihard": "batch_semihard_triplet_loss",
}


def _core_terms(mining, labels, embeddings, margin, distance, soft, ref_parts, ref_labels,
                anchor_offset, margin_tensor):
    return native.call(
        _core.triplet_terms, mining, labels, embeddings, margin, distance, soft,
        None if ref_parts is None else list(ref_parts), ref_labels, anchor_offset,
        margin_tensor=margin_tensor,
    )


def _first_order_terms(mining, labels, embeddings, margin, distance, soft, ref_parts,
                       ref_labels, anchor_offset, margin_tensor):
    """:func:`_core_terms` between :class:`_FirstOrderInputs` and
    :class:`_FirstOrderOutput`, all in one native call, so that
    ``torch.compile`` never traces those two (a traced backward would not
    refuse a second derivative)."""
    inputs = [embeddings, margin_tensor, *(ref_parts or ())]
    wanted = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    for i, t in zip(wanted, _FirstOrderInputs.apply(mining, *(inputs[i] for i in wanted))):
        inputs[i] = t
    embeddings, margin_tensor, *parts = inputs
    sum_, count, valid = _core.triplet_terms(
        mining, labels, embeddings, margin, distance, soft,
        None if ref_parts is None else parts, ref_labels, anchor_offset,
        margin_tensor=margin_tensor,
    )
    return _FirstOrderOutput.apply(sum_, mining), count, valid


class _FirstOrderInputs(torch.autograd.Function):
    """The identity on the tensors that batch-all or semi-hard differentiates.

    Their mining picks triplets by comparisons and batch-all's gradient is
    assembled from weights, so the core's graph has exact first derivatives
    but no correct second ones. Every path from the loss to the embeddings,
    the reference embeddings and a margin tensor passes through this node, so
    when a graph of the gradient is asked for (``create_graph=True``), the
    gradients it passes on, each attached to all those inputs, raise when
    differentiated instead of silently giving wrong second derivatives. The
    core's graph stays part of the caller's: one backward pass, which
    ``torch.utils.checkpoint`` (selective or not) recomputes once.
    """

    @staticmethod
    def forward(ctx, mining, *tensors):  # type: ignore[override]
        ctx.mining = mining
        ctx.save_for_backward(*tensors)
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: a second derivative may follow
            sources = ctx.saved_tensors
            grads = tuple(_NoSecondDerivative.apply(g, ctx.mining, *sources) for g in grads)
        return (None, *grads)


class _FirstOrderOutput(torch.autograd.Function):
    """The identity on the sum of batch-all or semi-hard, refusing batched
    gradients before the core's graph sees them."""

    @staticmethod
    def forward(ctx, sum_, mining):  # type: ignore[override]
        ctx.mining = mining
        return sum_.view_as(sum_)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        # autograd's own vmap (is_grads_batched) batches the incoming gradient,
        # under a dispatch key the DispatchKey enum does not list.
        if "Batched" in repr(torch._C._dispatch_keys(grad)):
            raise RuntimeError(
                f"{_NAMES[ctx.mining]}: batched gradients (jacobian(vectorize=True), "
                "autograd.grad(is_grads_batched=True)) are not supported through batch-all and "
                "semi-hard mining; compute them one output at a time (vectorize=False)."
            )
        return grad, None


class _NoSecondDerivative(torch.autograd.Function):
    """Passes a first derivative through, attached to the input it belongs
    to; differentiating it raises."""

    @staticmethod
    def forward(ctx, grad, mining, *sources):  # type: ignore[override]
        ctx.mining = mining
        return grad.clone()

    @staticmethod
    def backward(ctx, *_):  # type: ignore[override]
        raise RuntimeError(
            f"{_NAMES[ctx.mining]}: second derivatives (double backward, Hessians, gradient "
            "penalties) are not supported through batch-all and semi-hard mining, whose "
            "gradients are exact to first order only. batch_hard_triplet_loss supports them."
        )


@native.boundary
def terms(
    mining: str,
    labels: Tensor,
    embeddings: Tensor,
    margin: object,
    squared: object = False,
    *,
    distance: Optional[str] = None,
    soft: bool = False,
    ref_embeddings: Union[Tensor, Sequence[Tensor], None] = None,
    ref_labels: Optional[Tensor] = None,
    anchor_offset: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The unnormalised parts of a loss: ``(sum, count, valid)``, where the loss is
    ``sum / max(count, 1)`` and batch-all's fraction is ``count / max(valid, 1)``
    (:func:`loss_and_fraction`). With ``anchor_offset=k``, anchor ``i`` is
    reference ``k + i`` and never paired with itself. Used to combine batches
    across processes. ``sum`` is float64 whatever the embeddings' dtype (a sum
    of float32 hinges can overflow where their mean does not), and
    differentiable with respect to the embeddings, the reference embeddings
    and a margin tensor that requires grad; through batch-all and semi-hard
    only once. ``ref_embeddings`` may be given in parts, as in the losses."""
    refuse_tracing(_NAMES.get(mining, "triplet loss"))
    check_labels("labels", labels)
    check_tensor("embeddings", embeddings)
    parts = reference_parts(ref_embeddings, ref_labels)
    value, margin_tensor = margin_and_tensor(margin)
    if margin_tensor is None and isinstance(margin, Tensor) and _has_tangent(margin):
        # A dual margin carries its tangent into the loss also where no
        # gradient would reach it (not requiring grad, or under no_grad).
        margin_tensor = margin
    distance = resolve_distance(squared, distance)
    soft = check_flag("soft", soft)
    anchor_offset = check_anchor_offset(anchor_offset, embeddings, parts)
    if mining != "hard" and _has_tangent(embeddings, margin_tensor, *(parts or ())):
        raise NotImplementedError(
            f"{_NAMES[mining]}: forward-mode AD (torch.autograd.forward_ad) is not supported "
            "through batch-all and semi-hard mining, which compute their gradient for reverse "
            "mode only; use backward(), or batch_hard_triplet_loss, which supports both."
        )
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (embeddings, margin_tensor, *(parts or ()))
    )
    if mining == "hard" or not differentiable:
        return _core_terms(mining, labels, embeddings, value, distance, soft, parts,
                           ref_labels, anchor_offset, margin_tensor)
    return native.call(_first_order_terms, mining, labels, embeddings, value, distance, soft,
                       parts, ref_labels, anchor_offset, margin_tensor)


def _has_tangent(*tensors: Optional[Tensor]) -> bool:
    """Whether a tensor is a dual tensor of forward-mode AD's current level."""
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _autocast(embeddings: Tensor, ref_embeddings: object) -> Tuple[Tensor, object]:
    """:func:`native.autocast_inputs` of the embeddings and the references,
    one tensor or each of their parts (as a tuple: a subclass of list or tuple,
    such as a namedtuple, cannot always be rebuilt from its items)."""
    if isinstance(ref_embeddings, (list, tuple)):
        embeddings, *parts = native.autocast_inputs(embeddings, *ref_embeddings)
        return embeddings, tuple(parts)
    return native.autocast_inputs(embeddings, ref_embeddings)


def loss_and_fraction(mining: str, labels: Tensor, embeddings: Tensor, margin: object,
                      squared: object = False, **options) -> Tuple[Tensor, Tensor]:
    """The loss and the fraction of positive terms of :func:`terms` (same
    arguments), in the embeddings' dtype (float32 for float16 and bfloat16
    ones under autocast)."""
    embeddings, options["ref_embeddings"] = _autocast(embeddings, options.get("ref_embeddings"))
    sum_, count, valid = terms(mining, labels, embeddings, margin, squared, **options)
    return native.call(_core.mean_and_fraction, sum_, count, valid, embeddings)


def loss_of(mining: str, labels: Tensor, embeddings: Tensor, margin: object,
            squared: object = False, **options) -> Tensor:
    """The loss of :func:`loss_and_fraction`, without the fraction's operations."""
    embeddings, options["ref_embeddings"] = _autocast(embeddings, options.get("ref_embeddings"))
    sum_, count, _ = terms(mining, labels, embeddings, margin, squared, **options)
    return native.call(_core.mean, sum_, count, embeddings)


def batch_all_triplet_loss(
    labels: Tensor,
    embeddings: Tensor,
    margin: Union[float, Tensor],
    squared: bool = False,
    *,
    distance: Optional[str] = None,
    ref_embeddings: Union[Tensor, Sequence[Tensor], None] = None,
    ref_labels: Optional[Tensor] = None,
    anchor_offset: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    r"""Batch-all triplet loss over every valid triplet of the batch.

    .. math::
        L = \frac{1}{N_+} \sum_{(a,p,n)\ \text{valid}} \max(d_{ap} - d_{an} + m, 0),
        \qquad \text{fraction} = \frac{N_+}{N}

    where :math:`N` counts the valid triplets and :math:`N_+` those with a loss
    above 0. Both outputs are 0 when there is no such triplet. Runs in
    :math:`O(B^2 \log B)` time without any :math:`B^3` tensor. Differentiable
    once: asking for a second derivative raises a ``RuntimeError``.

    Args:
        labels: class ids, :math:`(B)`.
        embeddings: :math:`(B, D)`.
        margin: :math:`m`, :math:`\ge 0` and finite in the loss's dtype: a number or a one-element
            CPU tensor; a floating tensor that requires grad receives its gradient.
        squared: 0.0.6's switch to squared Euclidean distances; same as
            ``distance="squared"``.
        distance: ``"euclidean"`` (default), ``"squared"`` or ``"cosine"``
            (:math:`1 - \cos`).
        ref_embeddings: optional reference set to mine against: a tensor, or
            a list or tuple of tensors whose rows follow each other, the set
            their ``torch.cat`` would hold, without its cost: the gradient of
            the references is computed only for the rows up to the end of the
            last part that requires grad, so a memory bank that does not goes
            last, ``(embeddings, bank)``.
        ref_labels: labels of the reference set, all its rows.
        anchor_offset: when the reference set contains the anchors themselves,
            at rows ``anchor_offset`` to ``anchor_offset + B`` (e.g.
            ``(embeddings, bank)`` with ``anchor_offset=0``), that
            row: anchor :math:`i` is then reference ``anchor_offset + i``,
            never paired with itself (that row may hold other values, such
            as a stale bank entry: the anchor's own are used; another label
            there makes the loss and its gradients NaN), as in
            :class:`~online_triplet_loss.CrossBatchMemory`. ``None`` (the
            default) excludes nothing. An int in ``[0, M - B]``; without
            ``ref_embeddings`` only 0, the batch's own offset.

    Returns:
        ``(loss, fraction_positive_triplets)``, two scalars.
    
    Shape:
        - labels: :math:`(B)`, integer class ids (or floats holding class ids).
        - embeddings: :math:`(B, D)`, floating point; float16 and bfloat16 are
          computed in float32 and the loss is returned in their dtype (in
          float32 under autocast, as torch's ``triplet_margin_loss``).
        - ref_embeddings, ref_labels: :math:`(M, D)` in all and :math:`(M)`. When given,
          anchors are mined against this reference set instead of their own batch,
          and gradients flow into both.
        - Output: scalar.

    Example::

        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> embeddings = torch.randn(4, 8, requires_grad=True)
        >>> loss, fraction = batch_all_triplet_loss(labels, embeddings, margin=1.0)
        >>> loss.backward()
    """
    return loss_and_fraction(
        "all", labels, embeddings, margin, squared, distance=distance,
        ref_embeddings=ref_embeddings, ref_labels=ref_labels, anchor_offset=anchor_offset,
    )


def batch_hard_triplet_loss(
    labels: Tensor,
    embeddings: Tensor,
    margin: Union[float, Tensor],
    squared: bool = False,
    *,
    distance: Optional[str] = None,
    soft: bool = False,
    ref_embeddings: Union[Tensor, Sequence[Tensor], None] = None,
    ref_labels: Optional[Tensor] = None,
    anchor_offset: Optional[int] = None,
) -> Tensor:
    r"""Batch-hard triplet loss: the hardest positive and negative of each anchor.

    .. math::
        L = \frac{1}{|A|} \sum_{a \in A}
            h\big(\max_p d_{ap} - \min_n d_{an} + m\big)

    over the anchors :math:`A` that have at least one positive and one negative;
    :math:`h` is relu, or softplus when ``soft=True`` (with ``margin=0`` this is
    the soft margin of Hermans et al. 2017). 0 when :math:`A` is empty. Unlike
    0.0.6, anchors without a positive are not averaged in. Ties go to the lowest
    index. Twice differentiable: Hessians and gradient penalties work.

    Args:
        labels: class ids, :math:`(B)`.
        embeddings: :math:`(B, D)`.
        margin: :math:`m`, :math:`\ge 0` and finite in the loss's dtype: a number or a one-element
            CPU tensor; a floating tensor that requires grad receives its gradient.
        squared: 0.0.6's switch to squared Euclidean distances.
        distance: ``"euclidean"`` (default), ``"squared"`` or ``"cosine"``.
        soft: use softplus instead of relu.
        ref_embeddings: optional reference set to mine against: a tensor, or
            a list or tuple of tensors whose rows follow each other, the set
            their ``torch.cat`` would hold, without its cost: the gradient of
            the references is computed only for the rows up to the end of the
            last part that requires grad, so a memory bank that does not goes
            last, ``(embeddings, bank)``.
        ref_labels: labels of the reference set, all its rows.
        anchor_offset: when the reference set contains the anchors themselves,
            at rows ``anchor_offset`` to ``anchor_offset + B`` (e.g.
            ``(embeddings, bank)`` with ``anchor_offset=0``), that
            row: anchor :math:`i` is then reference ``anchor_offset + i``,
            never paired with itself (that row may hold other values, such
            as a stale bank entry: the anchor's own are used; another label
            there makes the loss and its gradients NaN), as in
            :class:`~online_triplet_loss.CrossBatchMemory`. ``None`` (the
            default) excludes nothing. An int in ``[0, M - B]``; without
            ``ref_embeddings`` only 0, the batch's own offset.
    
    Shape:
        - labels: :math:`(B)`, integer class ids (or floats holding class ids).
        - embeddings: :math:`(B, D)`, floating point; float16 and bfloat16 are
          computed in float32 and the loss is returned in their dtype (in
          float32 under autocast, as torch's ``triplet_margin_loss``).
        - ref_embeddings, ref_labels: :math:`(M, D)` in all and :math:`(M)`. When given,
          anchors are mined against this reference set instead of their own batch,
          and gradients flow into both.
        - Output: scalar.

    Example::

        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> embeddings = torch.randn(4, 8, requires_grad=True)
        >>> batch_hard_triplet_loss(labels, embeddings, margin=0.3).backward()
    """
    return loss_of(
        "hard", labels, embeddings, margin, squared, distance=distance, soft=soft,
        ref_embeddings=ref_embeddings, ref_labels=ref_labels, anchor_offset=anchor_offset,
    )


def batch_semihard_triplet_loss(
    labels: Tensor,
    embeddings: Tensor,
    margin: Union[float, Tensor],
    squared: bool = False,
    *,
    distance: Optional[str] = None,
    ref_embeddings: Union[Tensor, Sequence[Tensor], None] = None,
    ref_labels: Optional[Tensor] = None,
    anchor_offset: Optional[int] = None,
) -> Tensor:
    r"""Semi-hard triplet loss (FaceNet; TF Addons' ``TripletSemiHardLoss``).

    For each ordered positive pair :math:`(a, p)` whose anchor has a negative,
    :math:`n^*` is the negative with the smallest :math:`d_{an} > d_{ap}`, or the
    one with the largest :math:`d_{an}` if there is none:

    .. math::
        L = \frac{1}{|P|} \sum_{(a,p) \in P} \max(d_{ap} - d_{an^*} + m, 0)

    0 when :math:`P` is empty. Ties go to the lowest index. Runs in
    :math:`O(B^2 \log B)`. Differentiable once: asking for a second derivative
    raises a ``RuntimeError``.

    Args:
        labels: class ids, :math:`(B)`.
        embeddings: :math:`(B, D)`.
        margin: :math:`m`, :math:`\ge 0` and finite in the loss's dtype: a number or a one-element
            CPU tensor; a floating tensor that requires grad receives its gradient.
        squared: 0.0.6-style switch to squared Euclidean distances.
        distance: ``"euclidean"`` (default), ``"squared"`` or ``"cosine"``.
        ref_embeddings: optional reference set to mine against: a tensor, or
            a list or tuple of tensors whose rows follow each other, the set
            their ``torch.cat`` would hold, without its cost: the gradient of
            the references is computed only for the rows up to the end of the
            last part that requires grad, so a memory bank that does not goes
            last, ``(embeddings, bank)``.
        ref_labels: labels of the reference set, all its rows.
        anchor_offset: when the reference set contains the anchors themselves,
            at rows ``anchor_offset`` to ``anchor_offset + B`` (e.g.
            ``(embeddings, bank)`` with ``anchor_offset=0``), that
            row: anchor :math:`i` is then reference ``anchor_offset + i``,
            never paired with itself (that row may hold other values, such
            as a stale bank entry: the anchor's own are used; another label
            there makes the loss and its gradients NaN), as in
            :class:`~online_triplet_loss.CrossBatchMemory`. ``None`` (the
            default) excludes nothing. An int in ``[0, M - B]``; without
            ``ref_embeddings`` only 0, the batch's own offset.
    
    Shape:
        - labels: :math:`(B)`, integer class ids (or floats holding class ids).
        - embeddings: :math:`(B, D)`, floating point; float16 and bfloat16 are
          computed in float32 and the loss is returned in their dtype (in
          float32 under autocast, as torch's ``triplet_margin_loss``).
        - ref_embeddings, ref_labels: :math:`(M, D)` in all and :math:`(M)`. When given,
          anchors are mined against this reference set instead of their own batch,
          and gradients flow into both.
        - Output: scalar.

    Example::

        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> embeddings = torch.randn(4, 8, requires_grad=True)
        >>> batch_semihard_triplet_loss(labels, embeddings, margin=0.2).backward()
    """
    return loss_of(
        "semihard", labels, embeddings, margin, squared, distance=distance,
        ref_embeddings=ref_embeddings, ref_labels=ref_labels, anchor_offset=anchor_offset,
    )


def _keep_margin_on_cpu(module: nn.Module, name: str) -> None:
    """Brings a module's learned margin, the parameter ``name``, back to the
    CPU after the module moved (``_apply``), as the same parameter (the one an
    optimiser holds), with the dtype the move gave it: the core reads its
    value there without waiting for a device, and its gradient comes back
    with one copy in each backward pass."""
    margin = module._parameters.get(name)
    if margin is not None and margin.device.type not in ("cpu", "meta"):
        margin.data = margin.data.cpu()
        if margin.grad is not None:
            margin.grad = margin.grad.cpu()


class _TripletLoss(nn.Module):
    #: The mining this module stands for, as :func:`terms` names it.
    mining: str
    soft: bool = False

    def __init__(self, *, margin: Union[float, Tensor] = 1.0, distance: str = "euclidean") -> None:
        super().__init__()
        check_margin(margin)
        # An nn.Parameter (registered, and learned whenever it requires grad,
        # also if frozen at first) or another tensor that requires grad stays
        # a tensor; anything else is a float.
        if isinstance(margin, nn.Parameter) or (isinstance(margin, Tensor) and margin.requires_grad):
            if margin.grad_fn is not None:
                raise ValueError(
                    f"margin: a tensor computed from others ({type(margin.grad_fn).__name__}) would "
                    "be kept with its graph, which the first backward frees; pass an nn.Parameter "
                    "(or a leaf tensor), or compute the margin each step and call the function"
                )
            self.margin = margin
        else:
            self.margin = check_margin(margin)
        self.distance = check_distance(distance)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        _keep_margin_on_cpu(self, "margin")
        return self

    def extra_repr(self) -> str:
        margin = self.margin
        if isinstance(margin, Tensor):  # a learned or frozen margin, on one line
            if isinstance(margin, nn.Parameter):
                kind = "learned" if margin.requires_grad else "frozen"
            elif parametrize.is_parametrized(self, "margin"):
                kind = "parametrized"
            else:  # a tensor set on the module
                kind = "requires grad, " if margin.requires_grad else ""
                kind += "not a parameter of this module"
            margin = f"({kind}, on meta)" if margin.is_meta else f"{float(margin.detach()):.6g} ({kind})"
        return f"margin={margin}, distance={self.distance!r}"

    def __prepare_scriptable__(self) -> "_TripletLoss":
        refuse_scripting(type(self).__name__)
        return self

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        *,
        ref_embeddings: Union[Tensor, Sequence[Tensor], None] = None,
        ref_labels: Optional[Tensor] = None,
        anchor_offset: Optional[int] = None,
    ) -> Tensor:
        """The loss of ``embeddings`` :math:`(B, D)` with ``labels``
        :math:`(B)`, mined within the batch or against a reference set
        ``ref_embeddings`` :math:`(M, D)` (a tensor, or parts whose rows
        follow each other, such as ``(embeddings, bank)``) with
        ``ref_labels`` :math:`(M)` that holds the anchors from row
        ``anchor_offset`` on, if it holds them; a scalar in the embeddings'
        dtype. See the function this Module stands for."""
        if (
            isinstance(embeddings, Tensor)
            and isinstance(labels, Tensor)
            and embeddings.dim() == 1
            and labels.dim() == 2
        ):
            raise ValueError(
                f"embeddings: got a 1-D tensor of shape {tuple(embeddings.shape)} while labels "
                f"is 2-D of shape {tuple(labels.shape)}: the arguments look swapped; "
                "forward takes (embeddings, labels)"
            )
        # check_distance: None, which the functions read as 0.0.6's default,
        # is no distance of a Module's.
        return loss_of(
            self.mining, labels, embeddings, self.margin, distance=check_distance(self.distance),
            soft=self.soft, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
            anchor_offset=anchor_offset,
        )


class BatchAllTripletLoss(_TripletLoss):
    r"""Module form of :func:`batch_all_triplet_loss`; ``forward(embeddings, labels,
    *, ref_embeddings=None, ref_labels=None, anchor_offset=None)`` returns the loss (the fraction of
    positive triplets comes from the function).

    Args:
        margin: :math:`m`, :math:`\ge 0` and finite in the loss's dtype. Default: 1.0. A tensor that
            requires grad, or an ``nn.Parameter`` (also a frozen one), is kept
            and gets its gradient while it requires grad. An ``nn.Parameter`` is
            registered (``parameters()``, ``state_dict``, dtype casts); another
            tensor is not: whoever made it (an optimiser that holds it) learns it.
            A tensor computed from others (``softplus(raw)``) is refused: the
            first backward would free its graph.
        distance: ``"euclidean"`` (default), ``"squared"`` or ``"cosine"``.

    Shape:
        - embeddings: :math:`(B, D)`; labels: :math:`(B)`.
        - ref_embeddings: :math:`(M, D)`, or parts of it; ref_labels: :math:`(M)`.
        - output: scalar, in the embeddings' dtype (float32 under autocast).

    Example::

        >>> criterion = BatchAllTripletLoss(margin=0.2)
        >>> loss = criterion(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
    """

    mining = "all"

    def __init__(self, *, margin: Union[float, Tensor] = 1.0, distance: str = "euclidean") -> None:
        super().__init__(margin=margin, distance=distance)


class BatchHardTripletLoss(_TripletLoss):
    r"""Module form of :func:`batch_hard_triplet_loss`; ``forward(embeddings, labels,
    *, ref_embeddings=None, ref_labels=None, anchor_offset=None)`` returns the loss.

    Args:
        margin: :math:`m`, :math:`\ge 0` and finite in the loss's dtype. Default: 1.0. A tensor that
            requires grad, or an ``nn.Parameter`` (also a frozen one), is kept
            and gets its gradient while it requires grad. An ``nn.Parameter`` is
            registered (``parameters()``, ``state_dict``, dtype casts); another
            tensor is not: whoever made it (an optimiser that holds it) learns it.
            A tensor computed from others (``softplus(raw)``) is refused: the
            first backward would free its graph.
        distance: ``"euclidean"`` (default), ``"squared"`` or ``"cosine"``.
        soft: softplus instead of relu. Default: False.

    Shape:
        - embeddings: :math:`(B, D)`; labels: :math:`(B)`.
        - ref_embeddings: :math:`(M, D)`, or parts of it; ref_labels: :math:`(M)`.
        - output: scalar, in the embeddings' dtype (float32 under autocast).

    Example::

        >>> criterion = BatchHardTripletLoss(margin=0.0, soft=True)
        >>> loss = criterion(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
    """

    mining = "hard"

    def __init__(self, *, margin: Union[float, Tensor] = 1.0, distance: str = "euclidean",
                 soft: bool = False) -> None:
        super().__init__(margin=margin, distance=distance)
        self.soft = check_flag("soft", soft)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", soft={self.soft}"


class BatchSemiHardTripletLoss(_TripletLoss):
    r"""Module form of :func:`batch_semihard_triplet_loss`; ``forward(embeddings,
    labels, *, ref_embeddings=None, ref_labels=None, anchor_offset=None)`` returns the loss.

    Args:
        margin: :math:`m`, :math:`\ge 0` and finite in the loss's dtype. Default: 1.0. A tensor that
            requires grad, or an ``nn.Parameter`` (also a frozen one), is kept
            and gets its gradient while it requires grad. An ``nn.Parameter`` is
            registered (``parameters()``, ``state_dict``, dtype casts); another
            tensor is not: whoever made it (an optimiser that holds it) learns it.
            A tensor computed from others (``softplus(raw)``) is refused: the
            first backward would free its graph.
        distance: ``"euclidean"`` (default), ``"squared"`` or ``"cosine"``.

    Shape:
        - embeddings: :math:`(B, D)`; labels: :math:`(B)`.
        - ref_embeddings: :math:`(M, D)`, or parts of it; ref_labels: :math:`(M)`.
        - output: scalar, in the embeddings' dtype (float32 under autocast).

    Example::

        >>> criterion = BatchSemiHardTripletLoss(margin=0.2)
        >>> loss = criterion(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
    """

    mining = "semihard"

    def __init__(self, *, margin: Union[float, Tensor] = 1.0, distance: str = "euclidean") -> None:
        super().__init__(margin=margin, distance=distance)
