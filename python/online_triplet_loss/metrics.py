r"""Retrieval metrics for embeddings, computed exactly in the Rust core.

recall@k, MAP@R, the mean average precision over the whole ranking (the
mAP of person re-identification) and mINP (the mean inverse negative
penalty, R_q over the place of the last match), each alone or, with
:func:`retrieval_scores`, recall@k, mAP and mINP from one ranking. Every item
is a query against all the
*other* items. For a query :math:`q`, :math:`R_q` is the number of other
items with :math:`q`'s label; queries with :math:`R_q = 0` have nothing to
retrieve and are skipped. With a reference set (``ref_embeddings`` and
``ref_labels``: a gallery, as in person re-identification or retrieval
benchmarks), the items are the queries and each is ranked against the
reference set alone, :math:`R_q` the number of references with its label.
With cameras (``cameras``, and ``ref_cameras`` with a gallery), a query
retrieves no item of its own label from its own camera, as re-identification
benchmarks evaluate.

Queries are ranked in chunks against all items, so memory stays
:math:`O(B \cdot \text{chunk})`, plus two float64 copies of the embeddings:
100k × 64 embeddings need about 0.45 GB.
Identical items are at distance exactly 0 from each other, ahead of every
distinct item, as in the losses, and so, under the cosine distance, are rows
of one direction (v and 6v). Not under the cosine distance rows of norm
below 1e-12 times the largest entry of all the items (which are first scaled
by a power of two to about 1): as ``torch.nn.functional.normalize`` does,
they are divided by 1e-12 rather than by their norm, so a zero row is at 1
from every item and a tiny row at 1 - (norm / 1e-12)·cos. Items at equal distances
from a query rank with those of other labels first,
the order of the ties that no score gains from: ties (integer, binary or
quantised embeddings, copies, a collapsed model) never raise a score (under
the cosine distance, ties it compares exactly: the limits below), the
scores do not depend on the order of the items, and every function sees the
same ranking. Distances are computed in the embeddings' dtype from
their Gram products, whose rounding error grows with the items' distance
from the centre of the data; where it could change which of a query's
neighbours share its label (classes far tighter than their distance from the
centre, such as groups at ±1000 with spreads of 0.1 in float32, or cosine
distances within about 1e-4 radians), that query is ranked again in
float64, from the embeddings' differences where Gram products in float64
are not enough either. Those float64 distances have the last word, exact
only to float64's rounding: distances closer than about D·2⁻⁵³ relative
can tie or swap, and so can cosine distances of rows that are not small
integers and differ by less than normalising them rounds (rows of small
integers, squared norms below 4096 steps, such as 0/1 codes of up to 4095
bits, and rows that are such once divided by their largest entry, such as
normalised multi-hot or ternary codes, are compared exactly, as fractions,
when all the items are such, and parallel rows keep their ties). The bound on the rounding that decides this,
about 3D·u times the squared norms (u the dtype's unit roundoff), is the
worst case of any order of summation, so it holds also for products that
round the same way at every step (one coordinate far larger than the
others). Codes of one norm under the cosine distance (±1 codes of any
length, k-hot codes of one k) are ranked as by the squared Euclidean
distance, the same order, whose products do not round for them. On a GPU
that allows TF32 for float32 matrix products, embeddings of narrower dtypes
are ranked in float64. The functions
synchronise with the device (they return
Python numbers) and never build a graph; autocast does not reach their
products. They run without the GIL, and run Python's signal handlers between
chunks: Ctrl-C stops a long evaluation there with ``KeyboardInterrupt``.
"""

from __future__ import annotations

import numbers
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import _core, _native as native
from ._validation import (
    INT64_MAX,
    check_distance,
    check_int,
    check_labels,
    check_references,
    check_tensor,
    refuse_tracing,
)

__all__ = [
    "RetrievalScores",
    "retrieval_scores",
    "recall_at_k",
    "mean_average_precision_at_r",
    "mean_average_precision",
    "mean_inverse_negative_penalty",
]

def _check_ks(ks: object) -> List[int]:
    if hasattr(ks, "ndim") and hasattr(ks, "tolist"):
        ks = ks.tolist()  # tensors and arrays; 0-d ones become one k
    if isinstance(ks, numbers.Integral) and not isinstance(ks, bool):
        ks = (ks,)
    # A mapping would give its keys.
    if isinstance(ks, (str, bytes, Mapping)) or not isinstance(ks, Iterable):
        raise ValueError(f"ks: must be a sequence of positive ints, got {ks!r}")
    values = list(ks)
    if not values:
        raise ValueError(f"ks: must hold at least one k, got {ks!r}")
    for k in values:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"ks: every k must be an int >= 1, got {k!r} in {ks!r}")
        if k > INT64_MAX:
            raise ValueError(f"ks: every k must be at most 2**63 - 1, got {k!r} in {ks!r}")
    return [int(k) for k in values]


def _check_chunk_size(chunk_size: object) -> Optional[int]:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be None or an int >= 1, got {chunk_size!r}")
    return check_int("chunk_size", chunk_size, 1)


def _float64(embeddings: Tensor) -> bool:
    """Whether to rank in float64 whatever the dtype: on a GPU whose float32
    matrix products may use TF32 (``torch.backends.cuda.matmul.fp32_precision
    = "tf32"``, or ``torch.set_float32_matmul_precision("high")``), which keep
    about 10 bits, far beyond the rounding the certified float32 ranking
    bounds. float64 products never use TF32."""
    reduced = torch.backends.cuda.matmul.fp32_precision not in ("none", "ieee")
    return reduced and embeddings.is_cuda


def _scores(
    name: str, embeddings: Tensor, labels: Tensor, ks: List[int], full: Optional[bool],
    distance: str, chunk_size: object, cameras: Optional[Tensor],
    ref_embeddings: Optional[Tensor], ref_labels: Optional[Tensor], ref_cameras: Optional[Tensor],
) -> tuple:
    """(recalls, average precision, mINP, queries) from the core: ``full``
    None for neither, False for MAP@R, True over the whole ranking, with
    mINP."""
    refuse_tracing(name)
    check_tensor("embeddings", embeddings)
    check_labels("labels", labels)
    check_references(ref_embeddings, ref_labels)
    for argument, value in (("cameras", cameras), ("ref_cameras", ref_cameras)):
        if value is not None:
            check_labels(argument, value)
    return native.call(
        _core.retrieval_scores, embeddings.detach(), labels, ks,
        full=full, distance=check_distance(distance),
        chunk_size=_check_chunk_size(chunk_size), cameras=cameras,
        ref_embeddings=None if ref_embeddings is None else ref_embeddings.detach(),
        ref_labels=ref_labels, ref_cameras=ref_cameras, float64=_float64(embeddings),
    )


@native.boundary
def recall_at_k(
    embeddings: Tensor,
    labels: Tensor,
    ks: Union[int, Iterable[int]] = (1,),
    *,
    distance: str = "euclidean",
    chunk_size: Optional[int] = None,
    cameras: Optional[Tensor] = None,
    ref_embeddings: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    ref_cameras: Optional[Tensor] = None,
) -> Dict[int, float]:
    r"""Recall@k: how often an item of the query's class is among its k nearest.

    .. math::
        \text{recall@}k = \frac{1}{|Q|} \sum_{q \in Q}
            \mathbb{1}\big[\exists\, j \in N_k(q):\ y_j = y_q\big]

    where :math:`N_k(q)` are the :math:`k` nearest items other than :math:`q`
    (the :math:`k` nearest references, with a reference set) and :math:`Q` the
    queries with :math:`R_q > 0`. A :math:`k` above the number of items that
    can be retrieved counts all of them.

    Args:
        embeddings: the items, :math:`(B, D)`.
        labels: their class ids, :math:`(B)`.
        ks: one :math:`k` or several. Default: ``(1,)``.
        distance: ``"euclidean"`` (default), ``"squared"`` (ranks alike) or
            ``"cosine"``.
        chunk_size: queries ranked at a time; by default enough to keep each
            chunk's distance matrix near 4M entries.
        cameras: camera ids of the items, :math:`(B)`, for person
            re-identification: a query retrieves no item of its own label from
            its own camera (Market-1501, DukeMTMC-reID and MSMT17 evaluate so);
            those items count neither in :math:`R_q` nor in the ranking.
        ref_embeddings: a reference set (gallery) to rank the queries
            ``embeddings`` against instead of each other; not ``embeddings``
            itself. A query identical to a reference finds it at distance 0.
        ref_labels: the reference set's class ids, given with it.
        ref_cameras: the reference set's camera ids, given with ``cameras``.

    Returns:
        ``{k: recall}`` for every :math:`k` asked for.

    Raises:
        ValueError: on a bad argument, non-finite embeddings, or when no query
            has an item to retrieve: no item shares its label with another
            (with a reference set: no query's label is among ``ref_labels``;
            with cameras: in another camera).

    Shape:
        - embeddings: :math:`(B, D)`, floating point, finite; float16 and
          bfloat16 are ranked in float32 (float64 on a GPU that allows TF32).
        - labels: :math:`(B)`, integer class ids (or floats holding class ids),
          on any device.
        - ref_embeddings: :math:`(M, D)`, on the device of ``embeddings``; both
          are ranked in the wider of their dtypes.
        - ref_labels: :math:`(M)`, as ``labels``.
        - cameras, ref_cameras: :math:`(B)` and :math:`(M)`, integer ids (or
          floats holding them; NaN equals nothing), on any device.

    Example::

        >>> import torch
        >>> embeddings = torch.tensor([[0.0], [0.1], [5.0], [5.1], [0.25]])
        >>> labels = torch.tensor([0, 0, 1, 1, 1])
        >>> recall_at_k(embeddings, labels, ks=(1, 4))
        {1: 0.8, 4: 1.0}
        >>> gallery = torch.tensor([[0.1], [5.0], [5.1], [9.0]])
        >>> gallery_labels = torch.tensor([0, 1, 1, 2])
        >>> queries, query_labels = torch.tensor([[0.0], [5.2], [0.2]]), torch.tensor([0, 1, 1])
        >>> recall_at_k(queries, query_labels, ks=(1, 2),
        ...             ref_embeddings=gallery, ref_labels=gallery_labels)
        {1: 0.6666666666666666, 2: 1.0}
    """
    values = _check_ks(ks)
    recalls, _, _, _ = _scores("recall_at_k", embeddings, labels, values, None, distance, chunk_size,
                               cameras, ref_embeddings, ref_labels, ref_cameras)
    return dict(zip(values, recalls))


@native.boundary
def mean_average_precision_at_r(
    embeddings: Tensor,
    labels: Tensor,
    *,
    distance: str = "euclidean",
    chunk_size: Optional[int] = None,
    cameras: Optional[Tensor] = None,
    ref_embeddings: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    ref_cameras: Optional[Tensor] = None,
) -> float:
    r"""MAP@R (Musgrave et al., "A Metric Learning Reality Check", 2020).

    .. math::
        \text{MAP@R} = \frac{1}{|Q|} \sum_{q \in Q} \frac{1}{R_q}
            \sum_{i=1}^{R_q} P_q(i)\, \text{rel}_q(i)

    where :math:`\text{rel}_q(i)` is 1 when the :math:`i`-th nearest item other
    than :math:`q` has :math:`q`'s label, :math:`P_q(i)` is the fraction of the
    :math:`i` nearest that do, and :math:`Q` the queries with :math:`R_q > 0`.
    It is 1 exactly when every query's :math:`R_q` nearest are its class.

    Args:
        embeddings: the items, :math:`(B, D)`.
        labels: their class ids, :math:`(B)`.
        distance: ``"euclidean"`` (default), ``"squared"`` (ranks alike) or
            ``"cosine"``.
        chunk_size: queries ranked at a time; by default enough to keep each
            chunk's distance matrix near 4M entries.
        cameras: camera ids of the items, :math:`(B)`, for person
            re-identification: a query retrieves no item of its own label from
            its own camera (Market-1501, DukeMTMC-reID and MSMT17 evaluate so);
            those items count neither in :math:`R_q` nor in the ranking.
        ref_embeddings: a reference set (gallery) to rank the queries
            ``embeddings`` against instead of each other; not ``embeddings``
            itself. A query identical to a reference finds it at distance 0.
        ref_labels: the reference set's class ids, given with it.
        ref_cameras: the reference set's camera ids, given with ``cameras``.

    Returns:
        MAP@R, a float in :math:`[0, 1]`.

    Raises:
        ValueError: on a bad argument, non-finite embeddings, or when no query
            has an item to retrieve: no item shares its label with another
            (with a reference set: no query's label is among ``ref_labels``;
            with cameras: in another camera).

    Shape:
        - embeddings: :math:`(B, D)`, floating point, finite; float16 and
          bfloat16 are ranked in float32 (float64 on a GPU that allows TF32).
        - labels: :math:`(B)`, integer class ids (or floats holding class ids),
          on any device.
        - ref_embeddings: :math:`(M, D)`, on the device of ``embeddings``; both
          are ranked in the wider of their dtypes.
        - ref_labels: :math:`(M)`, as ``labels``.
        - cameras, ref_cameras: :math:`(B)` and :math:`(M)`, integer ids (or
          floats holding them; NaN equals nothing), on any device.

    Example::

        >>> import torch
        >>> embeddings = torch.tensor([[0.0], [0.1], [5.0], [5.1], [0.25]])
        >>> labels = torch.tensor([0, 0, 1, 1, 1])
        >>> round(mean_average_precision_at_r(embeddings, labels), 4)
        0.8
    """
    _, value, _, _ = _scores("mean_average_precision_at_r", embeddings, labels, [], False, distance,
                             chunk_size, cameras, ref_embeddings, ref_labels, ref_cameras)
    return value


@native.boundary
def mean_average_precision(
    embeddings: Tensor,
    labels: Tensor,
    *,
    distance: str = "euclidean",
    chunk_size: Optional[int] = None,
    cameras: Optional[Tensor] = None,
    ref_embeddings: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    ref_cameras: Optional[Tensor] = None,
) -> float:
    r"""The mean average precision over the whole ranking: the mAP that
    person re-identification benchmarks report (beside recall@1, their rank-1;
    with ``cameras``, under their rule that a query retrieves no item of its
    own identity from its own camera).

    .. math::
        \text{mAP} = \frac{1}{|Q|} \sum_{q \in Q} \frac{1}{R_q}
            \sum_{i=1}^{N_q} P_q(i)\, \text{rel}_q(i)

    with the terms of :func:`mean_average_precision_at_r`, summed over all
    :math:`N_q` items ranked for :math:`q` rather than its :math:`R_q` nearest.
    Every query is ranked against every item, :math:`O(N \log R_q)` time each
    (each item of another label is placed among the query's :math:`R_q`
    matches by a binary search, with no sort), in float64: for large
    evaluations without a gallery, MAP@R is the cheaper measure.

    Args:
        embeddings: the items, :math:`(B, D)`, or the queries, with a reference
            set.
        labels: their class ids, :math:`(B)`.
        distance: ``"euclidean"`` (default), ``"squared"`` (ranks alike) or
            ``"cosine"``.
        chunk_size: queries ranked at a time; by default enough to keep each
            chunk's distance matrix near 4M entries.
        cameras: camera ids of the items, :math:`(B)`, for person
            re-identification: a query retrieves no item of its own label from
            its own camera (Market-1501, DukeMTMC-reID and MSMT17 evaluate so);
            those items count neither in :math:`R_q` nor in the ranking.
        ref_embeddings: a reference set (gallery) to rank the queries
            ``embeddings`` against instead of each other; not ``embeddings``
            itself. A query identical to a reference finds it at distance 0.
        ref_labels: the reference set's class ids, given with it.
        ref_cameras: the reference set's camera ids, given with ``cameras``.

    Returns:
        mAP, a float in :math:`[0, 1]`.

    Raises:
        ValueError: as :func:`mean_average_precision_at_r`.

    Shape:
        As :func:`mean_average_precision_at_r`.

    Example::

        >>> import torch
        >>> embeddings = torch.tensor([[0.0], [0.1], [5.0], [5.1], [0.25]])
        >>> labels = torch.tensor([0, 0, 1, 1, 1])
        >>> round(mean_average_precision(embeddings, labels), 4)  # 0.25 finds its class 3rd and 4th
        0.8833
    """
    _, value, _, _ = _scores("mean_average_precision", embeddings, labels, [], True, distance,
                             chunk_size, cameras, ref_embeddings, ref_labels, ref_cameras)
    return value


@native.boundary
def mean_inverse_negative_penalty(
    embeddings: Tensor,
    labels: Tensor,
    *,
    distance: str = "euclidean",
    chunk_size: Optional[int] = None,
    cameras: Optional[Tensor] = None,
    ref_embeddings: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    ref_cameras: Optional[Tensor] = None,
) -> float:
    r"""mINP, the mean inverse negative penalty (Ye et al., "Deep Learning for
    Person Re-identification: A Survey and Outlook", 2021), which person
    re-identification reports beside rank-1 and mAP: how far down its ranking
    a query's hardest match lies.

    .. math::
        \text{mINP} = \frac{1}{|Q|} \sum_{q \in Q} \frac{R_q}{\text{rank}_q}

    where :math:`\text{rank}_q` is the place of the last item of :math:`q`'s
    label in :math:`q`'s whole ranking: the ratio is 1 when all :math:`R_q` of
    them come first. Items, :math:`R_q`, skipped queries, cameras, the reference set and
    the ranking are as in :func:`mean_average_precision`, and so is the cost.

    Args:
        embeddings: as in :func:`mean_average_precision`.
        labels: as in :func:`mean_average_precision`.
        distance: as in :func:`mean_average_precision`.
        chunk_size: as in :func:`mean_average_precision`.
        cameras: as in :func:`mean_average_precision`.
        ref_embeddings: as in :func:`mean_average_precision`.
        ref_labels: as in :func:`mean_average_precision`.
        ref_cameras: as in :func:`mean_average_precision`.

    Returns:
        mINP, a float in :math:`(0, 1]`.

    Raises:
        ValueError: as :func:`mean_average_precision_at_r`.

    Shape:
        As :func:`mean_average_precision_at_r`.

    Example::

        >>> import torch
        >>> embeddings = torch.tensor([[0.0], [0.1], [5.0], [5.1], [0.25]])
        >>> labels = torch.tensor([0, 0, 1, 1, 1])
        >>> mean_inverse_negative_penalty(embeddings, labels)  # 0.25's last match is 4th: 2/4
        0.9
    """
    _, _, value, _ = _scores("mean_inverse_negative_penalty", embeddings, labels, [], True,
                             distance, chunk_size, cameras, ref_embeddings, ref_labels, ref_cameras)
    return value


class RetrievalScores(NamedTuple):
    """What :func:`retrieval_scores` measures in one ranking of the queries."""

    recall: Dict[int, float]
    """``{k: recall@k}`` (rank-k), for every :math:`k` asked for."""
    mean_average_precision: float
    """mAP, as :func:`mean_average_precision`."""
    mean_inverse_negative_penalty: float
    """mINP, as :func:`mean_inverse_negative_penalty`."""
    queries: int
    """The number of queries averaged over: those with :math:`R_q > 0`."""


@native.boundary
def retrieval_scores(
    embeddings: Tensor,
    labels: Tensor,
    ks: Union[int, Iterable[int]] = (1, 5, 10),
    *,
    distance: str = "euclidean",
    chunk_size: Optional[int] = None,
    cameras: Optional[Tensor] = None,
    ref_embeddings: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    ref_cameras: Optional[Tensor] = None,
) -> RetrievalScores:
    r"""recall@k, mAP and mINP from one ranking of the queries: what person
    re-identification benchmarks report (rank-1, rank-5, rank-10, mAP, mINP),
    at the cost of one :func:`mean_average_precision` instead of three calls'.

    The definitions, items, skipped queries, cameras, reference set and
    ranking are those of :func:`recall_at_k`, :func:`mean_average_precision`
    and :func:`mean_inverse_negative_penalty`, and so are the values, also
    where distances tie (ranked with the items of other labels first). It
    returns the means over the queries, not per-query values or the whole CMC
    curve; junk items (Market-1501's label -1) are the caller's to remove.

    Args:
        embeddings: as in :func:`mean_average_precision`.
        labels: as in :func:`mean_average_precision`.
        ks: one :math:`k` or several, as in :func:`recall_at_k`. Default:
            ``(1, 5, 10)``.
        distance: as in :func:`mean_average_precision`.
        chunk_size: as in :func:`mean_average_precision`.
        cameras: as in :func:`mean_average_precision`.
        ref_embeddings: as in :func:`mean_average_precision`.
        ref_labels: as in :func:`mean_average_precision`.
        ref_cameras: as in :func:`mean_average_precision`.

    Returns:
        A :class:`RetrievalScores`: ``recall`` (``{k: recall@k}``),
        ``mean_average_precision``, ``mean_inverse_negative_penalty`` and
        ``queries``, the number of queries averaged over.

    Raises:
        ValueError: as :func:`recall_at_k`.

    Shape:
        As :func:`mean_average_precision_at_r`.

    Example::

        >>> import torch
        >>> embeddings = torch.tensor([[0.0], [0.1], [5.0], [5.1], [0.25]])
        >>> labels = torch.tensor([0, 0, 1, 1, 1])
        >>> scores = retrieval_scores(embeddings, labels, ks=(1, 4))
        >>> scores.recall, round(scores.mean_average_precision, 4), scores.queries
        ({1: 0.8, 4: 1.0}, 0.8833, 5)
        >>> scores.mean_inverse_negative_penalty  # 0.25's last match is 4th: 2/4
        0.9
    """
    values = _check_ks(ks)
    recalls, average_precision, penalty, queries = _scores(
        "retrieval_scores", embeddings, labels, values, True, distance, chunk_size,
        cameras, ref_embeddings, ref_labels, ref_cameras)
    return RetrievalScores(dict(zip(values, recalls)), average_precision, penalty, queries)
