r"""Triplet losses with online mining.

A valid triplet :math:`(a, p, n)` has :math:`a \ne p`, :math:`y_a = y_p` and
:math:`y_n \ne y_a`; :math:`d` is the distance and :math:`m` the margin.

The functions keep the signatures of online_triplet_loss 0.0.6, so
``from online_triplet_loss.losses import *`` keeps working. The modules follow
``torch.nn``: keyword-only settings and ``forward(embeddings, labels)``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import _core
from ._validation import check_margin, check_references, check_tensor, resolve_distance

__all__ = [
    "batch_all_triplet_loss",
    "batch_hard_triplet_loss",
    "batch_semihard_triplet_loss",
    "BatchAllTripletLoss",
    "BatchHardTripletLoss",
    "BatchSemiHardTripletLoss",
]



def terms(
    mining: str,
    labels: Tensor,
    embeddings: Tensor,
    margin: object,
    squared: object = False,
    *,
    distance: Optional[str] = None,
    soft: bool = False,
    ref_embeddings: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    anchor_offset: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The unnormalised parts of a loss: ``(sum, count, valid)``, where the loss is
    ``sum / max(count, 1)`` and batch-all's fraction is ``count / max(valid, 1)``
    (:func:`loss_and_fraction`). With ``anchor_offset=k``, anchor ``i`` is
    reference ``k + i`` and never its own positive. Used to combine batches
    across processes."""
    check_tensor("labels", labels)
    check_tensor("embeddings", embeddings)
    check_references(ref_embeddings, ref_labels)
    return _core.triplet_terms(
        mining, labels, embeddings, check_margin(margin), resolve_distance(squared, distance),
        bool(soft), ref_embeddings, ref_labels, anchor_offset,
    )


def loss_and_fraction(mining: str, labels: Tensor, embeddings: Tensor, margin: object,
                      squared: object = False, **options) -> Tuple[Tensor, Tensor]:
    """The loss and the fraction of positive terms of :func:`terms` (same
    arguments), in the embeddings' dtype."""
    sum_, count, valid = terms(mining, labels, embeddings, margin, squared, **options)
    return _core.mean_and_fraction(sum_, count, valid, embeddings)


def batch_all_triplet_loss(
    labels: Tensor,
    embeddings: Tensor,
    margin: float,
    squared: bool = False,
    *,
    distance: Optional[str] = None,
    ref_embeddings: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    r"""Batch-all triplet loss over every valid triplet of the batch.

    .. math::
        L = \frac{1}{N_+} \sum_{(a,p,n)\ \text{valid}} \max(d_{ap} - d_{an} + m, 0),
        \qquad \text{fraction} = \frac{N_+}{N}

    where :math:`N` counts the valid triplets and :math:`N_+` those with a loss
    above 0. Both outputs are 0 when there is no such triplet. Runs in
    :math:`O(B^2 \log B)` time without any :math:`B^3` tensor.

    Args:
        labels: class ids, :math:`(B)`.
        embeddings: :math:`(B, D)`.
        margin: :math:`m`, finite and :math:`\ge 0`.
        squared: 0.0.6's switch to squared Euclidean distances; same as
            ``distance="squared"``.
        distance: ``"euclidean"`` (default), ``"squared"`` or ``"cosine"``
            (:math:`1 - \cos`).
        ref_embeddings: optional reference set to mine against.
        ref_labels: labels of the reference set.

    Returns:
        ``(loss, fraction_positive_triplets)``, two scalars.
    
    Shape:
        - labels: :math:`(B)`, integer class ids (or floats holding class ids).
        - embeddings: :math:`(B, D)`, floating point; float16 and bfloat16 are
          computed in float32 and the loss is returned in their dtype.
        - ref_embeddings, ref_labels: :math:`(M, D)` and :math:`(M)`. When given,
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
        ref_embeddings=ref_embeddings, ref_labels=ref_labels,
    )


def batch_hard_triplet_loss(
    labels: Tensor,
    embeddings: Tensor,
    margin: float,
    squared: bool = False,
    *,
    distance: Optional[str] = None,
    soft: bool = False,
    ref_embeddings: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
) -> Tensor:
    r"""Batch-hard triplet loss: the hardest positive and negative of each anchor.

    .. math::
        L = \frac{1}{|A|} \sum_{a \in A}
            h\big(\max_p d_{ap} - \min_n d_{an} + m\big)

    over the anchors :math:`A` that have at least one positive and one negative;
    :math:`h` is relu, or softplus when ``soft=True`` (with ``margin=0`` this is
    the soft margin of Hermans et al. 2017). 0 when :math:`A` is empty. Unlike
    0.0.6, anchors without a positive are not averaged in. Ties go to the lowest
    index.

    Args:
        labels: class ids, :math:`(B)`.
        embeddings: :math:`(B, D)`.
        margin: :math:`m`, finite and :math:`\ge 0`.
        squared: 0.0.6's switch to squared Euclidean distances.
        distance: ``"euclidean"`` (default), ``"squared"`` or ``"cosine"``.
        soft: use softplus instead of relu.
        ref_embeddings: optional reference set to mine against.
        ref_labels: labels of the reference set.
    
    Shape:
        - labels: :math:`(B)`, integer class ids (or floats holding class ids).
        - embeddings: :math:`(B, D)`, floating point; float16 and bfloat16 are
          computed in float32 and the loss is returned in their dtype.
        - ref_embeddings, ref_labels: :math:`(M, D)` and :math:`(M)`. When given,
          anchors are mined against this reference set instead of their own batch,
          and gradients flow into both.
        - Output: scalar.

    Example::

        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> embeddings = torch.randn(4, 8, requires_grad=True)
        >>> batch_hard_triplet_loss(labels, embeddings, margin=0.3).backward()
    """
    return loss_and_fraction(
        "hard", labels, embeddings, margin, squared, distance=distance, soft=soft,
        ref_embeddings=ref_embeddings, ref_labels=ref_labels,
    )[0]


def batch_semihard_triplet_loss(
    labels: Tensor,
    embeddings: Tensor,
    margin: float,
    squared: bool = False,
    *,
    distance: Optional[str] = None,
    ref_embeddings: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
) -> Tensor:
    r"""Semi-hard triplet loss (FaceNet; TF Addons' ``TripletSemiHardLoss``).

    For each ordered positive pair :math:`(a, p)` whose anchor has a negative,
    :math:`n^*` is the negative with the smallest :math:`d_{an} > d_{ap}`, or the
    one with the largest :math:`d_{an}` if there is none:

    .. math::
        L = \frac{1}{|P|} \sum_{(a,p) \in P} \max(d_{ap} - d_{an^*} + m, 0)

    0 when :math:`P` is empty. Ties go to the lowest index. Runs in
    :math:`O(B^2 \log B)`.

    Args:
        labels: class ids, :math:`(B)`.
        embeddings: :math:`(B, D)`.
        margin: :math:`m`, finite and :math:`\ge 0`.
        squared: 0.0.6-style switch to squared Euclidean distances.
        distance: ``"euclidean"`` (default), ``"squared"`` or ``"cosine"``.
        ref_embeddings: optional reference set to mine against.
        ref_labels: labels of the reference set.
    
    Shape:
        - labels: :math:`(B)`, integer class ids (or floats holding class ids).
        - embeddings: :math:`(B, D)`, floating point; float16 and bfloat16 are
          computed in float32 and the loss is returned in their dtype.
        - ref_embeddings, ref_labels: :math:`(M, D)` and :math:`(M)`. When given,
          anchors are mined against this reference set instead of their own batch,
          and gradients flow into both.
        - Output: scalar.

    Example::

        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> embeddings = torch.randn(4, 8, requires_grad=True)
        >>> batch_semihard_triplet_loss(labels, embeddings, margin=0.2).backward()
    """
    return loss_and_fraction(
        "semihard", labels, embeddings, margin, squared, distance=distance,
        ref_embeddings=ref_embeddings, ref_labels=ref_labels,
    )[0]


class _TripletLoss(nn.Module):
    #: The mining this module stands for, as :func:`terms` names it.
    mining: str
    soft: bool = False

    def __init__(self, *, margin: float = 1.0, distance: str = "euclidean") -> None:
        super().__init__()
        self.margin = check_margin(margin)
        self.distance = resolve_distance(False, distance)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, distance={self.distance!r}"

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        *,
        ref_embeddings: Optional[Tensor] = None,
        ref_labels: Optional[Tensor] = None,
    ) -> Tensor:
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
        return loss_and_fraction(
            self.mining, labels, embeddings, self.margin, distance=self.distance,
            soft=self.soft, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
        )[0]


class BatchAllTripletLoss(_TripletLoss):
    r"""Module form of :func:`batch_all_triplet_loss`; ``forward(embeddings, labels,
    *, ref_embeddings=None, ref_labels=None)`` returns the loss (the fraction of
    positive triplets comes from the function).

    Args:
        margin: :math:`m`, finite and :math:`\ge 0`. Default: 1.0.
        distance: ``"euclidean"`` (default), ``"squared"`` or ``"cosine"``.

    Example::

        >>> criterion = BatchAllTripletLoss(margin=0.2)
        >>> loss = criterion(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
    """

    mining = "all"


class BatchHardTripletLoss(_TripletLoss):
    r"""Module form of :func:`batch_hard_triplet_loss`; ``forward(embeddings, labels,
    *, ref_embeddings=None, ref_labels=None)`` returns the loss.

    Args:
        margin: :math:`m`, finite and :math:`\ge 0`. Default: 1.0.
        distance: ``"euclidean"`` (default), ``"squared"`` or ``"cosine"``.
        soft: softplus instead of relu. Default: False.

    Example::

        >>> criterion = BatchHardTripletLoss(margin=0.0, soft=True)
        >>> loss = criterion(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
    """

    mining = "hard"

    def __init__(self, *, margin: float = 1.0, distance: str = "euclidean", soft: bool = False) -> None:
        super().__init__(margin=margin, distance=distance)
        self.soft = bool(soft)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", soft={self.soft}"


class BatchSemiHardTripletLoss(_TripletLoss):
    r"""Module form of :func:`batch_semihard_triplet_loss`; ``forward(embeddings,
    labels, *, ref_embeddings=None, ref_labels=None)`` returns the loss.

    Args:
        margin: :math:`m`, finite and :math:`\ge 0`. Default: 1.0.
        distance: ``"euclidean"`` (default), ``"squared"`` or ``"cosine"``.

    Example::

        >>> criterion = BatchSemiHardTripletLoss(margin=0.2)
        >>> loss = criterion(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
    """

    mining = "semihard"
