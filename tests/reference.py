"""Brute-force float64 references for the triplet losses.

Written from the definitions only, independently of the implementation:
every distance d(x_i, y_j) is computed from the difference x_i - y_j of its
two rows (broadcast over the pairs; no Gram-matrix |x|^2 + |y|^2 - 2 x.y
trick), so a row and its exact copy are exactly 0 apart and equal rows give
exactly equal distances. Every triplet / pair is enumerated with plain
Python loops over (anchor, positive, negative) indices; the selection (which
triplets are active, which positive / negative is hardest) is decided on
the Python float values of those distances. The loss is then built from the
float64 torch entries of the selected pair distances, so autograd through the
reference gives reference gradients.

Definitions (a = anchor, p = positive, n = negative, m = margin):

* valid triplet: a != p (as samples), y_a == y_p, y_n != y_a.
* batch-all: sum of relu(d_ap - d_an + m) over valid triplets, divided by the
  number of valid triplets whose loss is > 0; fraction = that number / number
  of valid triplets; both 0 when there is none.
* batch-hard: for every anchor with >= 1 positive and >= 1 negative,
  h(max_p d_ap - min_n d_an + m), h = relu or softplus (soft); mean over those
  anchors, 0 when none. Ties go to the lowest index.
* semi-hard: for each ordered positive pair (a, p) whose anchor has a
  negative, n* = the negative with the smallest d_an > d_ap (strict), else the
  negative with the largest d_an (ties to the lowest index); mean of
  relu(d_ap - d_an* + m) over those pairs, 0 when none.

Reference sets: anchors X (labels y), references Y (labels y_ref). With
``anchor_offset = k`` anchor i *is* reference k + i and is excluded as its own
positive; without an offset nothing is excluded. Without a reference set the
batch is its own reference set with offset 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

COSINE_EPS = 1e-12
DISTANCES = ("euclidean", "squared", "cosine")


@dataclass
class RefTerms:
    """Reference result: ``sum`` (float64 torch scalar, differentiable),
    ``count`` and ``valid`` (ints), and the derived ``loss`` / ``fraction``."""

    sum: torch.Tensor
    count: int
    valid: int

    @property
    def loss(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def fraction(self) -> float:
        return self.count / self.valid if self.valid else 0.0


def pair_distance(x: torch.Tensor, y: torch.Tensor, distance: str) -> torch.Tensor:
    """Distance between two 1-D float64 vectors, by direct difference."""
    return distance_matrix(x[None], y[None], distance)[0, 0]


def distance_matrix(x: torch.Tensor, y: torch.Tensor, distance: str) -> torch.Tensor:
    """``D[i, j] = d(x_i, y_j)`` computed entry by entry from the difference
    ``x_i - y_j`` (broadcast over the pairs, never through ``x @ y.T``), so
    that equal rows give exactly equal distances and a row and its duplicate
    are exactly 0 apart."""
    if distance == "euclidean":
        # vector_norm's gradient at 0 is 0 (a subgradient), so zero distances
        # contribute no gradient.
        return torch.linalg.vector_norm(x[:, None, :] - y[None, :, :], dim=-1)
    if distance == "squared":
        diff = x[:, None, :] - y[None, :, :]
        return (diff * diff).sum(-1)
    if distance == "cosine":
        xn = x / torch.clamp(torch.linalg.vector_norm(x, dim=-1, keepdim=True), min=COSINE_EPS)
        yn = y / torch.clamp(torch.linalg.vector_norm(y, dim=-1, keepdim=True), min=COSINE_EPS)
        return 1.0 - (xn[:, None, :] * yn[None, :, :]).sum(-1)
    raise ValueError(distance)


def _labels_list(labels: torch.Tensor) -> List[object]:
    # Python numbers compare by value: 1.5 != 1.0, and ints stay ints.
    return labels.tolist()


class _Problem:
    """Anchors, references, their labels, and the pair distances: ``D`` the
    differentiable float64 matrix, ``dv`` its values as Python floats (used
    for every comparison)."""

    def __init__(
        self,
        labels: torch.Tensor,
        embeddings: torch.Tensor,
        distance: str,
        ref_embeddings: Optional[torch.Tensor],
        ref_labels: Optional[torch.Tensor],
        anchor_offset: Optional[int],
    ) -> None:
        if distance not in DISTANCES:
            raise ValueError(distance)
        self.x = embeddings.to(torch.float64)
        self.y_a = _labels_list(labels)
        if ref_embeddings is None:
            self.y = self.x
            self.y_r = self.y_a
            self.offset: Optional[int] = 0
        else:
            self.y = ref_embeddings.to(torch.float64)
            self.y_r = _labels_list(ref_labels)
            self.offset = anchor_offset
        self.n = self.x.shape[0]
        self.m = self.y.shape[0]
        self.distance = distance
        self.D = distance_matrix(self.x, self.y, distance)
        self.dv = self.D.detach().tolist()

    def positives(self, a: int) -> List[int]:
        own = None if self.offset is None else self.offset + a
        return [j for j in range(self.m) if j != own and self.y_r[j] == self.y_a[a]]

    def negatives(self, a: int) -> List[int]:
        return [j for j in range(self.m) if self.y_r[j] != self.y_a[a]]

    def zero(self) -> torch.Tensor:
        # A zero that is still attached to the inputs (so backward works, and
        # a NaN / Inf anywhere in the inputs shows in the result).
        return self.x.sum() * 0.0 + self.y.sum() * 0.0

    def pick(self, rows: List[int], cols: List[int]) -> torch.Tensor:
        return self.D[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)]


def batch_all(labels, embeddings, margin, distance="euclidean", ref_embeddings=None,
              ref_labels=None, anchor_offset=None) -> RefTerms:
    pr = _Problem(labels, embeddings, distance, ref_embeddings, ref_labels, anchor_offset)
    # coef[a][j]: how often d(a, j) enters the sum of the active hinges, with
    # its sign (+1 per active triplet as the positive, -1 as the negative).
    coef = [[0] * pr.m for _ in range(pr.n)]
    count = 0
    valid = 0
    for a in range(pr.n):
        row = pr.dv[a]
        neg = pr.negatives(a)
        for p in pr.positives(a):
            for q in neg:
                valid += 1
                if row[p] - row[q] + margin > 0.0:
                    count += 1
                    coef[a][p] += 1
                    coef[a][q] -= 1
    c = torch.tensor(coef, dtype=torch.float64).reshape(pr.n, pr.m)
    total = pr.zero() + (c * pr.D).sum() + margin * count
    return RefTerms(total, count, valid)


def _argmax_lowest(values: Sequence[float]) -> int:
    best = 0
    for i in range(1, len(values)):
        if values[i] > values[best]:
            best = i
    return best


def _argmin_lowest(values: Sequence[float]) -> int:
    best = 0
    for i in range(1, len(values)):
        if values[i] < values[best]:
            best = i
    return best


def batch_hard(labels, embeddings, margin, distance="euclidean", soft=False,
               ref_embeddings=None, ref_labels=None, anchor_offset=None) -> RefTerms:
    pr = _Problem(labels, embeddings, distance, ref_embeddings, ref_labels, anchor_offset)
    anchors, hard_pos, hard_neg = [], [], []
    for a in range(pr.n):
        pos = pr.positives(a)
        neg = pr.negatives(a)
        if not pos or not neg:
            continue
        row = pr.dv[a]
        anchors.append(a)
        hard_pos.append(pos[_argmax_lowest([row[j] for j in pos])])
        hard_neg.append(neg[_argmin_lowest([row[j] for j in neg])])
    total = pr.zero()
    if anchors:
        z = pr.pick(anchors, hard_pos) - pr.pick(anchors, hard_neg) + margin
        # log(1 + e^z) exactly: F.softplus returns z itself above 20.
        total = total + (torch.logaddexp(z, torch.zeros_like(z)) if soft else torch.relu(z)).sum()
    return RefTerms(total, len(anchors), len(anchors))


def batch_semihard(labels, embeddings, margin, distance="euclidean", ref_embeddings=None,
                   ref_labels=None, anchor_offset=None) -> RefTerms:
    pr = _Problem(labels, embeddings, distance, ref_embeddings, ref_labels, anchor_offset)
    anchors, pos_idx, neg_idx = [], [], []
    for a in range(pr.n):
        neg = pr.negatives(a)
        if not neg:
            continue
        row = pr.dv[a]
        dan = [row[q] for q in neg]
        for p in pr.positives(a):
            dap = row[p]
            chosen = None
            for k in range(len(neg)):
                if dan[k] > dap and (chosen is None or dan[k] < dan[chosen]):
                    chosen = k
            if chosen is None:
                chosen = _argmax_lowest(dan)
            anchors.append(a)
            pos_idx.append(p)
            neg_idx.append(neg[chosen])
    total = pr.zero()
    if anchors:
        total = total + torch.relu(pr.pick(anchors, pos_idx) - pr.pick(anchors, neg_idx) + margin).sum()
    return RefTerms(total, len(anchors), len(anchors))


def reference_terms(mining: str, labels, embeddings, margin, distance="euclidean", soft=False,
                    ref_embeddings=None, ref_labels=None, anchor_offset=None) -> RefTerms:
    """Dispatch on the mining name used by ``online_triplet_loss._core``."""
    kw = dict(ref_embeddings=ref_embeddings, ref_labels=ref_labels, anchor_offset=anchor_offset)
    if mining == "all":
        return batch_all(labels, embeddings, margin, distance, **kw)
    if mining == "hard":
        return batch_hard(labels, embeddings, margin, distance, soft=soft, **kw)
    if mining == "semihard":
        return batch_semihard(labels, embeddings, margin, distance, **kw)
    raise ValueError(mining)


def batch_all_vectorized_per_anchor(labels: torch.Tensor, embeddings: torch.Tensor, margin: float,
                                    distance: str = "euclidean"):
    """Batch-all for large batches: loops over anchors, and per anchor builds
    the (positives x negatives) hinge matrix from directly differenced
    distances. Memory is O(B^2) per anchor at most, never B^3. Returns
    (sum as a float, count, valid)."""
    x = embeddings.detach().to(torch.float64)
    y = labels.to(torch.float64)  # exact for the small integer ids used here
    total = 0.0
    count = 0
    valid = 0
    for a in range(x.shape[0]):
        diff = x - x[a]
        if distance == "euclidean":
            d = torch.linalg.vector_norm(diff, dim=1)
        elif distance == "squared":
            d = (diff * diff).sum(1)
        else:
            raise ValueError(distance)
        same = y == y[a]
        same[a] = False
        diffc = y != y[a]
        h = torch.relu(d[same][:, None] - d[diffc][None, :] + margin)
        total += float(h.sum())
        count += int((h > 0).sum())
        valid += h.numel()
    return total, count, valid
