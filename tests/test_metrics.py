"""recall@k and MAP@R against brute force over float64 distances."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from online_triplet_loss.metrics import (
    mean_average_precision,
    mean_average_precision_at_r,
    mean_inverse_negative_penalty,
    recall_at_k,
    retrieval_scores,
)
from helpers import SIGINT_CHILD


def brute_force(embeddings: torch.Tensor, labels: torch.Tensor, ks, distance="euclidean",
                references=None, full=False, cameras=None, penalty=False):
    """Python loops over float64 distances: every query against every other item
    (or every item of ``references``, a pair of embeddings and labels), sorted;
    queries with no other item of their label skipped. Returns recall@k and
    MAP@R, or with ``full`` the average precision over the whole ranking, or
    with ``penalty`` mINP (the mean of R_q over the place of q's last match).
    ``cameras``, the queries' and the references' camera ids (one tensor
    without references): an item of the query's label and camera is dropped
    from its ranking. Among items at equal distances, those of other labels
    rank first. ``distance="exact cosine"`` ranks by the cosine distance in
    exact rational arithmetic instead: by -sign(x.y)(x.y)^2/(|x|^2|y|^2), as
    1 - cos ranks, a zero row at cos 0; rows of one direction, copies among
    them, are at -1 from each other, tied."""
    points = embeddings.double().tolist()
    ids = labels.tolist()
    if references is None:
        gallery, gallery_ids, own = points, ids, True
    else:
        gallery, gallery_ids, own = references[0].double().tolist(), references[1].tolist(), False
    if cameras is None:
        query_cams = gallery_cams = [None] * max(len(points), len(gallery))
    elif references is None:
        query_cams = gallery_cams = cameras.tolist()
    else:
        query_cams, gallery_cams = cameras[0].tolist(), cameras[1].tolist()

    def dist(a, b):
        if distance == "exact cosine":
            a, b = [Fraction(v) for v in a], [Fraction(v) for v in b]
            sa, sb = sum(v * v for v in a), sum(v * v for v in b)
            if sa == 0 or sb == 0:
                return Fraction(0)
            dot = sum(u * v for u, v in zip(a, b))
            return -Fraction(dot * abs(dot), sa * sb)
        if distance == "cosine":
            na = math.sqrt(sum(x * x for x in a))
            nb = math.sqrt(sum(y * y for y in b))
            if na > 1e-12 and nb > 1e-12:
                # 1 - cos as half the squared distance of the unit vectors,
                # which keeps the digits of close pairs.
                return 0.5 * sum((x / na - y / nb) ** 2 for x, y in zip(a, b))
            dot = sum(x * y for x, y in zip(a, b))
            return 1.0 - dot / (max(na, 1e-12) * max(nb, 1e-12))
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))

    hits = {k: 0 for k in ks}
    ap_sum, inp_sum, queries = 0.0, 0.0, 0
    for q in range(len(points)):
        # Equal distances rank the items of other labels first.
        others = sorted((dist(points[q], gallery[j]), gallery_ids[j] == ids[q])
                        for j in range(len(gallery)) if not (own and j == q)
                        and not (cameras is not None and gallery_ids[j] == ids[q]
                                 and gallery_cams[j] == query_cams[q]))
        relevant = [match for _, match in others]
        r = sum(relevant)
        if r == 0:
            continue
        queries += 1
        for k in ks:
            hits[k] += any(relevant[:k])
        found, ap = 0, 0.0
        for i in range(len(relevant) if full else r):
            if relevant[i]:
                found += 1
                ap += found / (i + 1)
        ap_sum += ap / r
        inp_sum += r / (max(i for i, rel in enumerate(relevant) if rel) + 1)
    recall = {k: h / queries for k, h in hits.items()}
    return recall, (inp_sum if penalty else ap_sum) / queries


def random_data(seed: int, n: int, dim: int, classes: int, singletons: int = 0, dtype=torch.float64):
    """Gaussian embeddings (ties have probability 0) with random labels, some classes
    of a single item (queries that are skipped)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    labels = torch.cat([labels, torch.arange(1000, 1000 + singletons)])
    embeddings = torch.randn(n + singletons, dim, generator=g, dtype=torch.float64)
    # Shift each class so that the metrics are far from 0 and from 1.
    embeddings += torch.randn(max(classes, 1), dim, generator=g, dtype=torch.float64)[labels % classes]
    perm = torch.randperm(n + singletons, generator=g)
    return embeddings[perm].to(dtype), labels[perm]


KS = (1, 2, 5, 17, 1000)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_matches_brute_force(seed, chunk_size):
    rnd = random.Random(seed)
    embeddings, labels = random_data(
        seed, n=rnd.randint(20, 70), dim=rnd.randint(1, 6), classes=rnd.randint(2, 9),
        singletons=rnd.randint(0, 4),
    )
    recall, map_at_r = brute_force(embeddings, labels, KS)
    got = recall_at_k(embeddings, labels, KS, chunk_size=chunk_size)
    assert list(got) == list(KS)
    for k in KS:
        assert got[k] == pytest.approx(recall[k], abs=1e-12), k
    assert mean_average_precision_at_r(embeddings, labels, chunk_size=chunk_size) == pytest.approx(
        map_at_r, abs=1e-12
    )
    # Both are informative on this data, not trivially 0 or 1.
    assert 0 < got[1] < 1 and 0 < map_at_r < 1


@pytest.mark.parametrize("seed", range(3))
def test_cosine_matches_brute_force(seed):
    embeddings, labels = random_data(seed, n=50, dim=4, classes=5, singletons=2)
    embeddings[3] *= 100.0  # the cosine distance ignores the norm
    recall, map_at_r = brute_force(embeddings, labels, KS, distance="cosine")
    got = recall_at_k(embeddings, labels, KS, distance="cosine")
    assert got == pytest.approx(recall, abs=1e-12)
    assert mean_average_precision_at_r(embeddings, labels, distance="cosine") == pytest.approx(
        map_at_r, abs=1e-12
    )


@pytest.mark.parametrize("offset", [1e4, 1e20, 1e30, -3e38])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_offset_shared_by_all_items(offset, dtype):
    # Euclidean rankings ignore an offset every item shares: a constant
    # column of 1e30 took the other entries below float32's normal range
    # when the items were scaled by it (recall@1 1/6 instead of 1).
    seed = 11
    embeddings, labels = random_data(seed, n=40, dim=3, classes=4, dtype=dtype)
    recall, map_at_r = brute_force(embeddings, labels, KS)
    shifted = torch.cat([torch.full((40, 1), offset, dtype=dtype), embeddings], dim=1)
    assert recall_at_k(shifted, labels, KS) == pytest.approx(recall, abs=1e-12)
    assert mean_average_precision_at_r(shifted, labels) == pytest.approx(map_at_r, abs=1e-12)


def copies_and_near_neighbours(seed: int = 3):
    """float32 unit vectors in D = 128, each with an exact copy and a neighbour
    of another label 3e-4 away: float32 Gram distances are off by about that
    much, so the copy must be found, not ranked by rounding."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(40, 128, generator=g), dim=1)
    near = torch.nn.functional.normalize(base + 3e-4 / 128 ** 0.5 * torch.randn(40, 128, generator=g), dim=1)
    embeddings = torch.cat([base, base, near])
    labels = torch.cat([torch.arange(40), torch.arange(40), torch.arange(100, 140)])
    perm = torch.randperm(120, generator=g)
    return embeddings[perm], labels[perm]


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_identical_items_are_nearest_in_float32(distance, chunk_size):
    embeddings, labels = copies_and_near_neighbours()
    want_recall, want_map = brute_force(embeddings, labels, (1, 2), distance)
    assert want_recall[1] == want_map == 1.0
    kw = dict(distance=distance, chunk_size=chunk_size)
    assert recall_at_k(embeddings, labels, (1, 2), **kw) == pytest.approx(want_recall)
    assert mean_average_precision_at_r(embeddings, labels, **kw) == pytest.approx(want_map)


def tight_classes_far_apart(distance: str, dtype=torch.float32, seed: int = 0):
    """Classes far tighter than their distance from the data's centre: for
    Euclidean distances, groups at +-1000 in every entry with spreads of
    about 0.1, each group holding interleaved classes 0.05 apart; for the
    cosine distance, classes within 1e-5 radians around a few directions.
    Gram distances in float32 are off by more than the distances within a
    group, so a ranking by them is noise (recall@1 about 1/2 at 820fee1).
    In float64, the spreads are 1e-6 of those (the groups at +-1e5, and
    classes 1e-11 radians apart), beyond float64's Gram distances too."""
    tight = 1.0 if dtype == torch.float32 else 1e-6
    g = torch.Generator().manual_seed(seed)
    n, dim, groups, per_group = 96, 16, 4, 3
    labels = torch.randint(0, groups * per_group, (n,), generator=g)
    group = labels // per_group
    if distance == "cosine":
        directions = torch.nn.functional.normalize(torch.randn(groups, dim, generator=g, dtype=torch.float64), dim=1)
        offsets = tight * 1e-5 * torch.randn(groups * per_group, dim, generator=g, dtype=torch.float64)
        embeddings = directions[group] + offsets[labels] + tight * 1e-5 * torch.randn(n, dim, generator=g, dtype=torch.float64)
        embeddings = embeddings * (1 + torch.rand(n, 1, generator=g, dtype=torch.float64))
    else:
        sign = torch.where(torch.rand(groups, dim, generator=g) < 0.5, -1.0, 1.0).double()
        offsets = 0.05 * torch.randn(groups * per_group, dim, generator=g, dtype=torch.float64)
        noise = 0.05 * torch.randn(n, dim, generator=g, dtype=torch.float64)
        embeddings = 1000 * sign[group] / tight ** (1 / 3) + tight * (offsets[labels] + noise)
    # Copies of a few items, which stay at distance 0 from them, ahead of the rest.
    return torch.cat([embeddings, embeddings[:8]]).to(dtype), torch.cat([labels, labels[:8]])


@pytest.mark.parametrize("distance", ["euclidean", "squared", "cosine"])
@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tight_classes_far_from_the_centre_are_ranked_exactly(distance, chunk_size, dtype):
    embeddings, labels = tight_classes_far_apart(distance, dtype)
    ks = (1, 2, 5)
    # The float32 values, ranked by float64 distances from their differences.
    recall, map_at_r = brute_force(embeddings, labels, ks, "cosine" if distance == "cosine" else "euclidean")
    assert 0.3 < recall[1] and 0.1 < map_at_r < 0.99
    kw = dict(distance=distance, chunk_size=chunk_size)
    assert recall_at_k(embeddings, labels, ks, **kw) == pytest.approx(recall, abs=1e-12)
    assert mean_average_precision_at_r(embeddings, labels, **kw) == pytest.approx(map_at_r, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distinct_rows_that_centring_would_merge_stay_distinct(dtype):
    """Found by review: copies were found among the centred points rounded back
    to the dtype, where a tight group near the origin, beside items far away,
    became one point; its distinct rows then ranked as copies, at 0, even when
    ranked again in float64 (recall@1 0.8 for 1.0)."""
    g = torch.Generator().manual_seed(0)
    tiny = 1e-6 if dtype == torch.float32 else 1e-15
    near = torch.cat([torch.full((5, 4), tiny, dtype=torch.float64),
                      torch.full((5, 4), -tiny, dtype=torch.float64)])
    near = near * (1 + 0.01 * torch.rand(10, 4, generator=g, dtype=torch.float64))
    far = 1e4 + torch.randn(10, 4, generator=g, dtype=torch.float64)
    embeddings = torch.cat([near, far]).to(dtype)
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 10)
    assert len(torch.unique(embeddings, dim=0)) == 20
    recall, map_at_r = brute_force(embeddings, labels, (1, 3))
    assert recall[1] == 1.0
    assert recall_at_k(embeddings, labels, (1, 3)) == pytest.approx(recall, abs=1e-12)
    assert mean_average_precision_at_r(embeddings, labels) == pytest.approx(map_at_r, abs=1e-12)


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 0, 2)])
def test_rounding_in_the_centring_is_not_taken_for_an_exact_grid(order):
    """Found by review: 2^-20 + 2^-60 less the centre (0.375) rounds to a
    point on a coarse grid, whose Gram products are exact, and the ranking
    was taken as exact too; but the true distance from 0 of that item (label
    1) is 2^-60 beyond that of -2^-20 (label 0), so recall@1 of 0 is a hit."""
    step = 2.0 ** -20
    values = [0.0, step + 2.0 ** -60, -step]
    labels = [0, 1, 0]
    index = list(order) + [3, 4]
    embeddings = torch.tensor([[(values + [1.0, 1.0])[i]] for i in index], dtype=torch.float64)
    ids = torch.tensor([(labels + [2, 2])[i] for i in index])
    recall, map_at_r = brute_force(embeddings, ids, (1,))
    for chunk_size in (None, 1):
        assert recall_at_k(embeddings, ids, (1,), chunk_size=chunk_size) == pytest.approx(recall, abs=1e-12)
        assert mean_average_precision_at_r(embeddings, ids, chunk_size=chunk_size) == pytest.approx(
            map_at_r, abs=1e-12)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("last", [30.0, 73.0, 150.0])
def test_rounding_one_way_at_every_step_stays_within_the_bound(distance, last):
    """Found by review: products dominated by one coordinate (4096 here, and
    4095 of about 1) round the same way at each step of their sum, beyond a
    bound of (16 + 2√D)·u times the squared norms, and a wrong neighbour
    (label 1) ranked first, unflagged, at last = 73: recall@1 0.5 for 1.0.
    The bound is now the worst case of any order of summation."""
    dim, big = 4096, 2.0 ** 12
    rows = []
    for first, rest, end in [(big, 1.0001, 1.0001), (big, 2.0 / 1.0001, 2.0 / 1.0001), (big, 1.0, last)]:
        row = torch.full((dim,), rest)
        row[0], row[-1] = first, end
        rows.append(row)
    embeddings = torch.cat([torch.stack(rows), -torch.stack(rows)]).float()
    labels = torch.tensor([0, 0, 1, 2, 3, 4])
    recall, map_at_r = brute_force(embeddings, labels, (1,), distance)
    assert recall_at_k(embeddings, labels, (1,), distance=distance) == pytest.approx(recall, abs=1e-12)
    assert mean_average_precision_at_r(embeddings, labels, distance=distance) == pytest.approx(
        map_at_r, abs=1e-12)
    scores = retrieval_scores(embeddings, labels, (1,), distance=distance)
    assert scores.recall == pytest.approx(recall, abs=1e-12)


class _Float64Ranking(TorchDispatchMode):
    """Records the float64 matrix products and sorts, the work of ranking
    queries again (the metrics' own work is in the embeddings' dtype)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packets = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.sort)
        if func.overloadpacket in packets and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args
        ):
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_float64_ranking_for_tf32_is_plumbed_to_the_core():
    """With TF32 allowed on a GPU the package asks the core to rank in float64
    (``float64=True``, tested on CUDA in test_cuda.py); here, on binary codes
    that float32 ranks exactly, the flag alone makes the products float64,
    the result unchanged, and wrong-typed embeddings are still refused."""
    from online_triplet_loss import _core

    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (300,), generator=g)
    embeddings = torch.sign(torch.randn(10, 32, generator=g)[labels] + torch.randn(300, 32, generator=g))
    results = []
    for float64 in (False, True):
        with _Float64Ranking() as ranking:
            results.append(_core.retrieval_scores(embeddings, labels, [1, 5], full=False, distance="euclidean",
                                                  float64=float64))
        assert (ranking.seen != []) == float64, ranking.seen[:5]
    assert results[0] == results[1]
    with pytest.raises(ValueError, match="embeddings: must be floating point"):
        _core.retrieval_scores(embeddings.long(), labels, [1], full=None, distance="euclidean", float64=True)


@pytest.mark.parametrize("data", ["binary codes", "integers", "all equal", "tight classes"])
def test_exact_gram_products_rank_nothing_again(data):
    """Integer, binary or identical float32 embeddings have exact Gram
    distances, whose ties are real: no query is ranked again in float64
    (each was, a tie group at a time, 25 to 38 times slower, found by
    review). Tight classes far from the centre are."""
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (300,), generator=g)
    if data == "binary codes":
        embeddings = torch.sign(torch.randn(10, 32, generator=g)[labels] + torch.randn(300, 32, generator=g))
    elif data == "integers":
        embeddings = torch.randint(0, 3, (300, 16), generator=g).float()
    elif data == "all equal":
        embeddings = torch.randn(1, 16, generator=g).repeat(300, 1)
    else:
        embeddings, labels = tight_classes_far_apart("euclidean")
    with _Float64Ranking() as ranking:
        recall_at_k(embeddings, labels, (1, 5))
        mean_average_precision_at_r(embeddings, labels)
    assert (ranking.seen != []) == (data == "tight classes"), ranking.seen[:5]


def test_float32_and_other_label_types():
    embeddings, labels = random_data(11, n=60, dim=3, classes=4, singletons=3)
    recall, map_at_r = brute_force(embeddings.float(), labels, (1, 3))
    for ids in (labels, labels.int(), labels.double()):
        got = recall_at_k(embeddings.float(), ids, (1, 3))
        assert got == pytest.approx(recall, abs=1e-12)
        assert mean_average_precision_at_r(embeddings.float(), ids) == pytest.approx(map_at_r, abs=1e-12)
    # squared Euclidean ranks like Euclidean
    assert recall_at_k(embeddings, labels, (1, 3), distance="squared") == pytest.approx(
        brute_force(embeddings, labels, (1, 3))[0], abs=1e-12
    )


def test_hand_computed_example():
    # 0.25 (label 1) has two label-0 items as its nearest: a miss at k=1 and AP@R = 0;
    # every other query has its R nearest all of its label.
    embeddings = torch.tensor([[0.0], [0.1], [5.0], [5.1], [0.25]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    assert recall_at_k(embeddings, labels, ks=(1, 2, 3, 4)) == {1: 0.8, 2: 0.8, 3: 1.0, 4: 1.0}
    assert mean_average_precision_at_r(embeddings, labels) == pytest.approx(0.8)
    # AP@R with a relevant item at rank 2 of R = 2: (0 + 1/2) / 2.
    embeddings = torch.tensor([[0.0], [1.0], [1.5], [10.0], [11.0], [30.0]])
    labels = torch.tensor([0, 1, 0, 0, 2, 2])
    # query 0: R=2, ranking 1.0 (no), 1.5 (yes) -> AP 0.25; query 2: R=2, 1.0 (no), 0.0 (yes) -> 0.25
    # query 3: R=2, 11 (no), 1.5 (yes) -> 0.25; queries 4 and 5: R=1, nearest other is 10 / 11
    assert mean_average_precision_at_r(embeddings, labels) == pytest.approx((0.25 * 3 + 0 + 1) / 5)
    assert recall_at_k(embeddings, labels, ks=1) == {1: pytest.approx(1 / 5)}


def test_skipped_queries_change_nothing():
    embeddings, labels = random_data(5, n=40, dim=3, classes=4)
    base_recall = recall_at_k(embeddings, labels, (1, 5))
    base_map = mean_average_precision_at_r(embeddings, labels)
    # Singleton classes far from everything: skipped as queries, never anyone's neighbour
    # within the ranks that count.
    far = torch.full((3, 3), 1e3, dtype=torch.float64) * torch.tensor([[1.0], [2.0], [3.0]])
    more = torch.cat([embeddings, far])
    more_labels = torch.cat([labels, torch.tensor([100, 101, 102])])
    assert recall_at_k(more, more_labels, (1, 5)) == pytest.approx(base_recall, abs=1e-12)
    assert mean_average_precision_at_r(more, more_labels) == pytest.approx(base_map, abs=1e-12)


def test_perfect_and_permutation_invariant():
    labels = torch.arange(30) % 3
    embeddings = torch.nn.functional.one_hot(labels).double() * 10 + 0.01 * torch.randn(30, 3, dtype=torch.float64)
    assert recall_at_k(embeddings, labels, (1, 29)) == {1: 1.0, 29: 1.0}
    assert mean_average_precision_at_r(embeddings, labels) == pytest.approx(1.0)
    data, ids = random_data(3, n=45, dim=2, classes=5)
    perm = torch.randperm(45)
    assert recall_at_k(data[perm], ids[perm], (1, 4)) == pytest.approx(recall_at_k(data, ids, (1, 4)), abs=1e-12)


def test_no_graph_and_accepts_requires_grad():
    embeddings, labels = random_data(2, n=20, dim=3, classes=3)
    embeddings.requires_grad_(True)
    assert isinstance(recall_at_k(embeddings, labels)[1], float)
    assert isinstance(mean_average_precision_at_r(embeddings, labels), float)
    assert embeddings.grad is None


def test_twenty_thousand_items_chunked_against_a_torch_reference():
    """20k x 64 (chunked over queries, a few seconds): agrees with an
    independent chunked torch computation of recall@1 and recall@10."""
    g = torch.Generator().manual_seed(0)
    n = 20_000
    labels = torch.randint(0, 50, (n,), generator=g)
    embeddings = torch.randn(n, 64, generator=g) + 0.4 * torch.randn(50, 64, generator=g)[labels]
    got = recall_at_k(embeddings, labels, (1, 10))
    x = embeddings.double()
    hits1 = hits10 = 0
    for s in range(0, n, 500):
        d = torch.cdist(x[s:s + 500], x)
        d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = math.inf
        nearest = d.topk(10, largest=False).indices
        same = labels[nearest] == labels[s:s + 500, None]
        hits1 += int(same[:, 0].sum())
        hits10 += int(same.any(1).sum())
    # float32 ranking may swap near-ties against the float64 reference
    assert got[1] == pytest.approx(hits1 / n, abs=2e-4)
    assert got[10] == pytest.approx(hits10 / n, abs=2e-4)
    assert 0.05 < got[1] < 0.95


def test_ks_as_tensors_and_arrays():
    embeddings, labels = random_data(5, 30, 4, 4)
    want = recall_at_k(embeddings, labels, (1, 3))
    assert recall_at_k(embeddings, labels, torch.tensor([1, 3])) == want
    assert recall_at_k(embeddings, labels, torch.tensor(3)) == {3: want[3]}
    assert recall_at_k(embeddings, labels, np.array([1, 3])) == want


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ks=0), "ks: every k must be an int >= 1, got 0"),
        (dict(ks=[]), r"ks: must hold at least one k, got \[\]"),
        (dict(ks="1"), "ks: must be a sequence of positive ints, got '1'"),
        (dict(ks=[1, 2.5]), r"ks: every k must be an int >= 1, got 2.5"),
        (dict(ks=[True]), r"ks: every k must be an int >= 1, got True"),
        (dict(ks=torch.tensor(1.5)), "ks: must be a sequence of positive ints, got 1.5"),
        (dict(ks=torch.tensor([1, 0])), r"ks: every k must be an int >= 1, got 0"),
        (dict(distance="manhattan"), "distance: expected one of .* got 'manhattan'"),
        (dict(distance=None), "distance: expected one of .* got None"),
        (dict(ks={1: 5}), r"ks: must be a sequence of positive ints, got \{1: 5\}"),
        (dict(chunk_size=0), "chunk_size: must be None or an int >= 1, got 0"),
    ],
)
def test_recall_argument_errors(kwargs, match):
    embeddings, labels = random_data(0, n=10, dim=2, classes=2)
    with pytest.raises(ValueError, match=match):
        recall_at_k(embeddings, labels, **kwargs)


@pytest.mark.parametrize("metric", [lambda e, l: recall_at_k(e, l), mean_average_precision_at_r])
def test_input_errors(metric):
    embeddings, labels = random_data(0, n=10, dim=2, classes=2)
    cases = [
        (embeddings[:, 0], labels, "embeddings: must be 2-D"),
        (embeddings.long(), labels, "embeddings: must be floating point"),
        (embeddings, labels[:9], "labels: has 9 entries but embeddings has 10 rows"),
        (embeddings, labels[:, None], "labels: must be 1-D"),
        (embeddings[:0], labels[:0], "embeddings: must hold at least one item"),
        (torch.where(torch.arange(10)[:, None] == 4, math.nan, embeddings), labels, "embeddings: must be finite"),
        (embeddings, torch.arange(10), "labels: no item shares its label"),
        (embeddings.tolist(), labels, "embeddings: must be a torch.Tensor"),
        (embeddings, labels.tolist(), "labels: must be a torch.Tensor"),
    ]
    for e, l, match in cases:
        with pytest.raises(ValueError, match=match):
            metric(e, l)
    with pytest.raises(ValueError, match="distance: expected one of"):
        mean_average_precision_at_r(embeddings, labels, distance="l1")


_INTERRUPTED_CHILD = SIGINT_CHILD + """
import sys
import torch
from online_triplet_loss.metrics import mean_average_precision_at_r, recall_at_k

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x, y = torch.randn(30_000, 16, generator=g), torch.randint(0, 300, (30_000,), generator=g)
small = x[:500], y[:500]

for metric in (lambda: recall_at_k(x, y, (1,)), lambda: mean_average_precision_at_r(x, y)):
    start = time.perf_counter()
    want = metric()
    whole = time.perf_counter() - start
    # Ctrl-C: a KeyboardInterrupt early, not at the end.
    got, seconds, _ = interrupted(metric, KeyboardInterrupt)
    assert isinstance(got, KeyboardInterrupt), got
    assert seconds < 0.1 + whole / 2, (seconds, whole)
    # A handler's own exception comes out unchanged.
    got, _, _ = interrupted(metric, Stop)
    assert isinstance(got, Stop) and str(got) == "from the handler", got
    # One that returns lets the evaluation finish, with the same result.
    got, _, signals = interrupted(metric, None)
    assert got == want and signals > 0, (got, want, signals)
    # On another thread, where Python runs no handler, the same result.
    box = []
    worker = threading.Thread(target=lambda: box.append(metric()))
    got, _, signals = interrupted(lambda: (worker.start(), worker.join(), box)[2], None)
    assert got == [want] and signals > 0, (got, want, signals)
    assert recall_at_k(*small, (1,)) == recall_at_k(*small, (1,))  # still usable
print("ok")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_stops_a_long_evaluation_between_chunks():
    """The metrics run in native code without the GIL; between chunks (at
    most every 100 ms) they run Python's signal handlers, so Ctrl-C stops a
    long evaluation (30k items, about a second here) early instead of at
    its end."""
    proc = subprocess.run([sys.executable, "-c", _INTERRUPTED_CHILD], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr



# With a reference set (a gallery): queries ranked against it alone.


def query_and_gallery(seed: int, dtype=torch.float64):
    """Queries and a gallery of other sizes, drawn from the same classes; some
    query classes have no gallery item (skipped queries), some gallery classes
    no query, and a few queries are exact copies of gallery items."""
    rnd = random.Random(seed)
    embeddings, labels = random_data(seed, n=rnd.randint(40, 90), dim=rnd.randint(2, 6),
                                     classes=rnd.randint(3, 9), singletons=3, dtype=dtype)
    q = rnd.randint(5, len(labels) - 10)
    queries, query_labels = embeddings[:q].clone(), labels[:q]
    gallery, gallery_labels = embeddings[q:], labels[q:]
    queries[:2] = gallery[:2]
    query_labels = torch.cat([query_labels[:-1], torch.tensor([777])])  # in no gallery
    return (queries, query_labels), (gallery, gallery_labels)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
@pytest.mark.parametrize("distance", ["euclidean", "squared", "cosine"])
def test_reference_set_matches_brute_force(seed, chunk_size, distance):
    (x, y), (gx, gy) = query_and_gallery(seed)
    brute = "cosine" if distance == "cosine" else "euclidean"
    recall, map_at_r = brute_force(x, y, KS, brute, references=(gx, gy))
    kw = dict(distance=distance, chunk_size=chunk_size, ref_embeddings=gx, ref_labels=gy)
    assert recall_at_k(x, y, KS, **kw) == pytest.approx(recall, abs=1e-12)
    assert mean_average_precision_at_r(x, y, **kw) == pytest.approx(map_at_r, abs=1e-12)
    assert 0 < recall[1] < 1 and 0 < map_at_r < 1


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_set_of_tight_classes_far_from_the_centre_is_ranked_exactly(distance, chunk_size, dtype):
    embeddings, labels = tight_classes_far_apart(distance, dtype)
    # The last 8 rows are copies of the first 8: queries with a copy in the gallery.
    x, y, gx, gy = embeddings[60:], labels[60:], embeddings[:60], labels[:60]
    ks = (1, 2, 5)
    recall, map_at_r = brute_force(x, y, ks, "cosine" if distance == "cosine" else "euclidean",
                                   references=(gx, gy))
    assert 0.3 < recall[1] and 0.1 < map_at_r < 0.99
    kw = dict(distance=distance, chunk_size=chunk_size, ref_embeddings=gx, ref_labels=gy)
    assert recall_at_k(x, y, ks, **kw) == pytest.approx(recall, abs=1e-12)
    assert mean_average_precision_at_r(x, y, **kw) == pytest.approx(map_at_r, abs=1e-12)


def test_reference_set_hand_computed_example():
    gallery = torch.tensor([[0.1], [5.0], [5.1], [9.0], [0.0]])
    gallery_labels = torch.tensor([0, 1, 1, 2, 3])
    # 0.0 (label 0): nearest is its copy of label 3, then 0.1 -> miss at 1, AP@1 = 0.
    # 5.2 (label 1): 5.1, 5.0 -> hit, AP@2 = 1. 0.2 (label 1): 0.1, 0.0, then 5.0 at
    # rank 3 -> miss at 1 and 2, AP@2 = 0. 3.0 (label 4): no reference, skipped.
    queries = torch.tensor([[0.0], [5.2], [0.2], [3.0]])
    labels = torch.tensor([0, 1, 1, 4])
    kw = dict(ref_embeddings=gallery, ref_labels=gallery_labels)
    assert recall_at_k(queries, labels, ks=(1, 2, 3, 5, 10), **kw) == {
        1: 1 / 3, 2: 2 / 3, 3: 1.0, 5: 1.0, 10: 1.0}
    assert mean_average_precision_at_r(queries, labels, **kw) == pytest.approx(1 / 3)


def test_reference_set_mixes_dtypes_and_label_types():
    (x, y), (gx, gy) = query_and_gallery(1)
    recall, map_at_r = brute_force(x, y, (1, 3), references=(gx, gy))
    # float32 queries against a float64 gallery are ranked in float64.
    kw = dict(ref_embeddings=gx, ref_labels=gy.double())
    assert recall_at_k(x.float().double(), y.int(), (1, 3), **kw) == pytest.approx(
        brute_force(x.float().double(), y, (1, 3), references=(gx, gy))[0], abs=1e-12)
    assert recall_at_k(x, y, (1, 3), **kw) == pytest.approx(recall, abs=1e-12)
    assert mean_average_precision_at_r(x, y.int(), **kw) == pytest.approx(map_at_r, abs=1e-12)
    # A NaN reference label matches no query.
    nan_labels = gy.double().clone()
    nan_labels[gy == y[5]] = math.nan
    want = brute_force(x, torch.where(y == y[5], -1, y), (1, 3),
                       references=(gx, torch.where(gy == y[5], -2, gy)))
    assert recall_at_k(x, y.double(), (1, 3), ref_embeddings=gx, ref_labels=nan_labels) == \
        pytest.approx(want[0], abs=1e-12)


def test_reference_set_equals_pml_accuracy_calculator():
    """PML's AccuracyCalculator with a reference set that excludes the queries."""
    pml = pytest.importorskip("pytorch_metric_learning", reason="pytorch-metric-learning is a dev dependency")
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    del pml
    calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                                    knn_func=CustomKNN(LpDistance(normalize_embeddings=False)),
                                    k="max_bin_count", device=torch.device("cpu"))
    g = torch.Generator().manual_seed(8)
    for _ in range(3):
        gy, y = torch.randint(0, 6, (60,), generator=g), torch.randint(0, 6, (25,), generator=g)
        gx = torch.randn(60, 4, generator=g, dtype=torch.float64)
        x = torch.randn(25, 4, generator=g, dtype=torch.float64)
        want = calculator.get_accuracy(x, y, gx, gy, ref_includes_query=False)
        kw = dict(ref_embeddings=gx, ref_labels=gy)
        assert recall_at_k(x, y, ks=(1,), **kw)[1] == pytest.approx(want["precision_at_1"], rel=1e-12)
        assert mean_average_precision_at_r(x, y, **kw) == pytest.approx(
            want["mean_average_precision_at_r"], rel=1e-12)


@pytest.mark.parametrize("metric", [recall_at_k, mean_average_precision_at_r])
def test_reference_set_errors(metric):
    (x, y), (gx, gy) = query_and_gallery(0)
    cases = [
        (dict(ref_embeddings=gx), "ref_embeddings and ref_labels: must be given together"),
        (dict(ref_labels=gy), "ref_embeddings and ref_labels: must be given together"),
        (dict(ref_embeddings=gx[:, :1], ref_labels=gy), r"ref_embeddings: must have the embedding size"),
        (dict(ref_embeddings=gx, ref_labels=gy[:3]), "ref_labels: has 3 entries but ref_embeddings has"),
        (dict(ref_embeddings=gx[:0], ref_labels=gy[:0]), "ref_embeddings: must hold at least one item"),
        (dict(ref_embeddings=gx.long(), ref_labels=gy), "ref_embeddings: must be floating point"),
        (dict(ref_embeddings=gx / 0, ref_labels=gy), "ref_embeddings: must be finite"),
        (dict(ref_embeddings=gx, ref_labels=gy[:, None]), "ref_labels: must be 1-D"),
        (dict(ref_embeddings=gx, ref_labels=gy + 10**6), "labels: no query's label is among ref_labels"),
        (dict(ref_embeddings=x, ref_labels=y), "ref_embeddings: is embeddings itself"),
        (dict(ref_embeddings=gx.tolist(), ref_labels=gy), "ref_embeddings: must be a torch.Tensor"),
        (dict(ref_embeddings=gx, ref_labels=gy.tolist()), "ref_labels: must be a torch.Tensor"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            metric(x, y, **kw)
    # Only the tensor itself is refused: not the same bytes read as another
    # dtype, nor empty rows (whose data pointers are all 0).
    half = x[:6].half()
    recall_at_k(half, y[:6], (1,), ref_embeddings=half.view(torch.bfloat16), ref_labels=y[:6])
    recall_at_k(torch.zeros(6, 0), y[:6], (1,), ref_embeddings=torch.zeros(6, 0), ref_labels=y[:6])
    # A copy of the queries is a gallery like any other: each finds its copy.
    recall, at_r = brute_force(x, y, (1,), references=(x.clone(), y))
    got = metric(x, y, ref_embeddings=x.clone(), ref_labels=y)
    assert got == pytest.approx(at_r if metric is mean_average_precision_at_r else recall, abs=1e-12)


# The mean average precision over the whole ranking (re-identification's mAP).


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
@pytest.mark.parametrize("distance", ["euclidean", "squared", "cosine"])
@pytest.mark.parametrize("gallery", [False, True])
def test_full_mean_average_precision_matches_brute_force(seed, chunk_size, distance, gallery):
    brute = "cosine" if distance == "cosine" else "euclidean"
    kw = dict(distance=distance, chunk_size=chunk_size)
    if gallery:
        (x, y), (gx, gy) = query_and_gallery(seed)
        kw.update(ref_embeddings=gx, ref_labels=gy)
        references = (gx, gy)
    else:
        rnd = random.Random(seed)
        x, y = random_data(seed, n=rnd.randint(20, 70), dim=rnd.randint(2, 6),
                           classes=rnd.randint(2, 9), singletons=rnd.randint(0, 4))
        references = None
    _, want = brute_force(x, y, (1,), brute, references=references, full=True)
    _, at_r = brute_force(x, y, (1,), brute, references=references)
    assert mean_average_precision(x, y, **kw) == pytest.approx(want, abs=1e-12)
    assert 0 < want < 1 and want != pytest.approx(at_r, abs=1e-6), "mAP and MAP@R should differ here"
    _, minp = brute_force(x, y, (1,), brute, references=references, penalty=True)
    assert mean_inverse_negative_penalty(x, y, **kw) == pytest.approx(minp, abs=1e-12)
    assert 0 < minp < 1 and minp != pytest.approx(want, abs=1e-6), "mINP and mAP should differ here"


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gallery", [False, True])
def test_full_mean_average_precision_of_tight_classes_is_exact(distance, dtype, gallery):
    embeddings, labels = tight_classes_far_apart(distance, dtype)
    brute = "cosine" if distance == "cosine" else "euclidean"
    if gallery:
        x, y, references = embeddings[60:], labels[60:], (embeddings[:60], labels[:60])
        kw = dict(ref_embeddings=references[0], ref_labels=references[1])
    else:
        x, y, references, kw = embeddings, labels, None, {}
    _, want = brute_force(x, y, (1,), brute, references=references, full=True)
    assert 0.1 < want < 0.99
    _, minp = brute_force(x, y, (1,), brute, references=references, penalty=True)
    for chunk_size in (None, 5):
        assert mean_average_precision(x, y, distance=distance, chunk_size=chunk_size, **kw) == \
            pytest.approx(want, abs=1e-12)
        assert mean_inverse_negative_penalty(x, y, distance=distance, chunk_size=chunk_size,
                                             **kw) == pytest.approx(minp, abs=1e-12)


def _whole_ranking_scores(x, y, c, gx, gy, gc, ks):
    """Rank-1/k, mAP and mINP with the re-identification protocol from one
    sort of float64 distances per query, vectorised: items of the query's
    label and camera dropped, equal distances ranking the other labels first
    (a stable sort by distance after one by relevance)."""
    d = torch.cdist(x.double(), gx.double())
    same = y[:, None] == gy[None]
    junk = same & (c[:, None] == gc[None])
    d[junk] = float("inf")
    by_relevance = torch.argsort(same.to(torch.int8), dim=1, stable=True)
    order = by_relevance.gather(1, torch.argsort(d.gather(1, by_relevance), dim=1, stable=True))
    relevant = (same & ~junk).gather(1, order)
    r = relevant.sum(1)
    keep = r > 0
    relevant, r = relevant[keep], r[keep]
    place = torch.arange(1, relevant.shape[1] + 1, dtype=torch.float64)
    found = relevant.cumsum(1).double()
    ap = ((found / place) * relevant).sum(1) / r
    last = (place * relevant).amax(1)
    first = torch.where(relevant, place, float("inf")).amin(1)
    recall = {k: float((first <= k).double().mean()) for k in ks}
    return recall, float(ap.mean()), float((r / last).mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [None, 37])
def test_whole_rankings_of_many_items_against_sorted_float64(dtype, chunk_size):
    """The whole ranking counts, for each item of another label, the query's
    items closer than it (no sort): checked against a sort, at a size where
    queries differ in R_q within a chunk, some queries have their own
    camera's items excluded and some none."""
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(40, 16, generator=g, dtype=torch.float64)

    def items(n):
        labels = torch.randint(0, 40, (n,), generator=g)
        cameras = torch.randint(0, 4, (n,), generator=g)
        return (centres[labels] + 0.8 * torch.randn(n, 16, generator=g, dtype=torch.float64)).to(dtype), \
            labels, cameras

    x, y, c = items(300)
    gx, gy, gc = items(2000)
    recall, want_map, want_minp = _whole_ranking_scores(x, y, c, gx, gy, gc, (1, 5))
    assert 0.2 < want_map < 0.9
    kw = dict(ref_embeddings=gx, ref_labels=gy, cameras=c, ref_cameras=gc, chunk_size=chunk_size)
    scores = retrieval_scores(x, y, (1, 5), **kw)
    assert scores.mean_average_precision == pytest.approx(want_map, abs=1e-12)
    assert scores.mean_inverse_negative_penalty == pytest.approx(want_minp, abs=1e-12)
    assert scores.recall == pytest.approx(recall, abs=1e-12)
    assert mean_average_precision(x, y, **kw) == scores.mean_average_precision


def test_full_mean_average_precision_hand_computed():
    # Against the gallery of test_reference_set_hand_computed_example: 0.0 finds
    # its class 2nd (AP 1/2); 5.2 finds 5.1 and 5.0 first (AP 1); 0.2 finds
    # its class 3rd and 4th (AP (1/3 + 2/4) / 2); 3.0 has no reference.
    gallery = torch.tensor([[0.1], [5.0], [5.1], [9.0], [0.0]])
    gallery_labels = torch.tensor([0, 1, 1, 2, 3])
    queries = torch.tensor([[0.0], [5.2], [0.2], [3.0]])
    labels = torch.tensor([0, 1, 1, 4])
    got = mean_average_precision(queries, labels, ref_embeddings=gallery, ref_labels=gallery_labels)
    assert got == pytest.approx((1 / 2 + 1 + (1 / 3 + 2 / 4) / 2) / 3)
    # mINP: 0.0's one match is 2nd, 5.2's two are 1st and 2nd, 0.2's last is 4th.
    got = mean_inverse_negative_penalty(queries, labels, ref_embeddings=gallery,
                                        ref_labels=gallery_labels)
    assert got == pytest.approx((1 / 2 + 2 / 2 + 2 / 4) / 3)


def test_full_mean_average_precision_equals_pml_with_every_neighbour():
    """PML's mean_average_precision over as many neighbours as there are
    items to rank is the AP over the whole ranking."""
    pytest.importorskip("pytorch_metric_learning", reason="pytorch-metric-learning is a dev dependency")
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    def calculator(k):
        return AccuracyCalculator(include=("mean_average_precision",),
                                  knn_func=CustomKNN(LpDistance(normalize_embeddings=False)),
                                  k=k, device=torch.device("cpu"))

    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        gy, y = torch.randint(0, 6, (60,), generator=g), torch.randint(0, 6, (25,), generator=g)
        gx = torch.randn(60, 4, generator=g, dtype=torch.float64)
        x = torch.randn(25, 4, generator=g, dtype=torch.float64)
        want = calculator(60).get_accuracy(x, y, gx, gy, ref_includes_query=False)
        got = mean_average_precision(x, y, ref_embeddings=gx, ref_labels=gy)
        assert got == pytest.approx(want["mean_average_precision"], rel=1e-12)
        want = calculator(59).get_accuracy(gx, gy)
        assert mean_average_precision(gx, gy) == pytest.approx(want["mean_average_precision"], rel=1e-12)


@pytest.mark.parametrize("metric", [mean_average_precision, mean_inverse_negative_penalty])
def test_full_ranking_errors(metric):
    (x, y), (gx, gy) = query_and_gallery(0)
    with pytest.raises(ValueError, match="labels: no item shares its label"):
        metric(x, torch.arange(len(y)))
    with pytest.raises(ValueError, match="ref_embeddings and ref_labels: must be given together"):
        metric(x, y, ref_embeddings=gx)
    with pytest.raises(ValueError, match="ref_embeddings: must have the embedding size"):
        metric(x, y, ref_embeddings=gx[:, :1], ref_labels=gy)
    with pytest.raises(ValueError, match="distance: expected one of"):
        metric(x, y, distance="l1")
    with pytest.raises(ValueError, match="chunk_size: must be None or an int >= 1"):
        metric(x, y, chunk_size=0)
    with pytest.raises(ValueError, match="ref_embeddings: is embeddings itself"):
        metric(x, y, ref_embeddings=x, ref_labels=y)


# Cameras: a query retrieves no item of its own label from its own camera
# (the re-identification protocol of Market-1501 and its successors).


def with_cameras(seed, n):
    return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(100 + seed))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("gallery", [False, True])
def test_cameras_match_brute_force(seed, chunk_size, distance, gallery):
    brute = "cosine" if distance == "cosine" else "euclidean"
    kw = dict(distance=distance, chunk_size=chunk_size)
    if gallery:
        (x, y), (gx, gy) = query_and_gallery(seed)
        cams, ref_cams = with_cameras(seed, len(y)), with_cameras(seed + 50, len(gy))
        # The copies of gallery items among the queries: one in its own camera.
        cams[0] = ref_cams[0]
        kw.update(ref_embeddings=gx, ref_labels=gy, cameras=cams, ref_cameras=ref_cams)
        references, cameras = (gx, gy), (cams, ref_cams)
    else:
        rnd = random.Random(seed)
        x, y = random_data(seed, n=rnd.randint(30, 70), dim=rnd.randint(2, 6),
                           classes=rnd.randint(2, 6), singletons=2)
        cams = with_cameras(seed, len(y))
        kw.update(cameras=cams)
        references, cameras = None, cams
    recall, at_r = brute_force(x, y, KS, brute, references=references, cameras=cameras)
    _, full = brute_force(x, y, KS, brute, references=references, cameras=cameras, full=True)
    plain = brute_force(x, y, KS, brute, references=references)
    assert abs(at_r - plain[1]) > 1e-6, "the cameras should change the scores"
    assert recall_at_k(x, y, KS, **kw) == pytest.approx(recall, abs=1e-12)
    assert mean_average_precision_at_r(x, y, **kw) == pytest.approx(at_r, abs=1e-12)
    assert mean_average_precision(x, y, **kw) == pytest.approx(full, abs=1e-12)
    _, minp = brute_force(x, y, KS, brute, references=references, cameras=cameras, penalty=True)
    assert mean_inverse_negative_penalty(x, y, **kw) == pytest.approx(minp, abs=1e-12)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cameras_with_tight_classes_far_from_the_centre(distance, dtype):
    """The float64 re-ranking leaves out a query's own camera too."""
    embeddings, labels = tight_classes_far_apart(distance, dtype)
    cams = with_cameras(0, len(labels))
    brute = "cosine" if distance == "cosine" else "euclidean"
    for gallery in (False, True):
        if gallery:
            x, y, references = embeddings[60:], labels[60:], (embeddings[:60], labels[:60])
            cameras = (cams[60:], cams[:60])
            kw = dict(ref_embeddings=references[0], ref_labels=references[1], cameras=cameras[0],
                      ref_cameras=cameras[1])
        else:
            x, y, references, cameras, kw = embeddings, labels, None, cams, dict(cameras=cams)
        for chunk_size in (None, 5):
            recall, at_r = brute_force(x, y, (1, 2, 5), brute, references=references, cameras=cameras)
            _, full = brute_force(x, y, (1,), brute, references=references, cameras=cameras, full=True)
            assert recall_at_k(x, y, (1, 2, 5), chunk_size=chunk_size, distance=distance, **kw) == \
                pytest.approx(recall, abs=1e-12)
            assert mean_average_precision_at_r(x, y, chunk_size=chunk_size, distance=distance, **kw) == \
                pytest.approx(at_r, abs=1e-12)
            assert mean_average_precision(x, y, chunk_size=chunk_size, distance=distance, **kw) == \
                pytest.approx(full, abs=1e-12)


def test_cameras_hand_computed():
    # Query 5.2 (camera 0) may not retrieve 5.1 (label 1, camera 0), nor 0.2
    # (camera 1) 5.0; 0.0 (camera 1) may not retrieve its copy at 0.0, of its
    # label and camera, and finds 0.1 first. 3.0 has no reference.
    gallery = torch.tensor([[0.1], [5.0], [5.1], [9.0], [0.0]])
    gallery_labels = torch.tensor([0, 1, 1, 2, 0])
    gallery_cams = torch.tensor([0, 1, 0, 0, 1])
    queries = torch.tensor([[0.0], [5.2], [0.2], [3.0]])
    labels, cams = torch.tensor([0, 1, 1, 4]), torch.tensor([1, 0, 1, 0])
    kw = dict(ref_embeddings=gallery, ref_labels=gallery_labels, cameras=cams, ref_cameras=gallery_cams)
    # 0.0: R = 1, 0.1 first; 5.2: R = 1 (5.0), first; 0.2: R = 1 (5.1), after 0.1 and 0.0.
    assert recall_at_k(queries, labels, ks=(1, 2, 3), **kw) == {1: 2 / 3, 2: 2 / 3, 3: 1.0}
    assert mean_average_precision(queries, labels, **kw) == pytest.approx((1 + 1 + 1 / 3) / 3)
    assert mean_average_precision_at_r(queries, labels, **kw) == pytest.approx(2 / 3)
    # One match each, so mINP is the mAP here.
    assert mean_inverse_negative_penalty(queries, labels, **kw) == pytest.approx((1 + 1 + 1 / 3) / 3)
    # Without a gallery: each item's own-camera items of its label are dropped.
    x = torch.tensor([[0.0], [0.1], [0.2], [0.05]])
    y, c = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 0])
    # 0.0 and 0.1 (camera 0) each retrieve only 0.2 (R = 1), after 0.05
    # (label 1); 0.2 retrieves 0.1, then 0.05, then 0.0 (R = 2).
    assert recall_at_k(x, y, ks=1, cameras=c) == {1: 1 / 3}
    assert mean_average_precision(x, y, cameras=c) == pytest.approx((1 / 2 + 1 / 2 + (1 + 2 / 3) / 2) / 3)


def test_nan_cameras_equal_nothing():
    """A NaN camera id is no camera's, not even another NaN's: wherever the
    NaNs stand in the queries and in the gallery (query i and gallery item i
    with NaN cameras were once taken for one camera)."""
    queries, labels = torch.tensor([[0.0]]), torch.tensor([0])
    gallery, gallery_labels = torch.tensor([[0.0], [1.0], [5.0]]), torch.tensor([0, 1, 0])
    for nan_at in (0, 2):
        gallery_cams = torch.tensor([3.0, 1.0, 1.0])
        gallery_cams[nan_at] = math.nan
        kw = dict(ref_embeddings=gallery, ref_labels=gallery_labels, cameras=torch.tensor([math.nan]),
                  ref_cameras=gallery_cams)
        assert recall_at_k(queries, labels, 1, **kw) == {1: 1.0}
        assert mean_average_precision(queries, labels, **kw) == pytest.approx((1 + 2 / 3) / 2)
    # Without a gallery, NaN cameras are distinct too: every other item counts.
    x, y = torch.tensor([[0.0], [0.1], [3.0]]), torch.tensor([0, 0, 1])
    assert recall_at_k(x, y, 1, cameras=torch.full((3,), math.nan)) == {1: 1.0}


def test_camera_errors():
    (x, y), (gx, gy) = query_and_gallery(0)
    cams, ref_cams = with_cameras(0, len(y)), with_cameras(1, len(gy))
    g = dict(ref_embeddings=gx, ref_labels=gy)
    for metric in (recall_at_k, mean_average_precision_at_r, mean_average_precision,
                   mean_inverse_negative_penalty):
        cases = [
            (dict(cameras=cams[:3]), "cameras: has 3 entries but embeddings has"),
            (dict(cameras=cams[:, None]), "cameras: must be 1-D"),
            (dict(cameras=cams.tolist()), "cameras: must be a torch.Tensor"),
            (dict(cameras=cams.to(torch.complex64)), "cameras: dtype torch.complex64 is not"),
            (dict(cameras=cams.to(torch.uint32)), "cameras: dtype torch.uint32 is not"),
            (dict(ref_cameras=ref_cams), "ref_cameras: are the cameras of ref_embeddings, which is not"),
            (dict(cameras=cams, **g), "ref_cameras: must be given with cameras"),
            (dict(ref_cameras=ref_cams, **g), "cameras: must be given with ref_cameras"),
            (dict(cameras=cams, ref_cameras=ref_cams[:4], **g), "ref_cameras: has 4 entries but ref_embeddings"),
            (dict(cameras=torch.zeros_like(y)), None),
        ]
        for kw, match in cases:
            if match is None:
                # Every class in one camera: no query has an item to retrieve.
                with pytest.raises(ValueError, match="labels: no item shares its label with another "
                                                     "item from another camera"):
                    metric(x, y, **kw)
                continue
            with pytest.raises(ValueError, match=match):
                metric(x, y, **kw)


# retrieval_scores: recall@k, mAP and mINP from one ranking.


def counted_queries(labels, ref_labels=None, cameras=None):
    """The queries with an item of their label to retrieve (another item, or a
    reference, not from their own camera)."""
    ids = labels.tolist()
    own = ref_labels is None
    refs = ids if own else ref_labels.tolist()
    if cameras is None:
        query_cams = ref_cams = [None] * max(len(ids), len(refs))
    elif own:
        query_cams = ref_cams = cameras.tolist()
    else:
        query_cams, ref_cams = (c.tolist() for c in cameras)
    return sum(any(refs[j] == ids[q] and not (own and j == q)
                   and (cameras is None or ref_cams[j] != query_cams[q]) for j in range(len(refs)))
               for q in range(len(ids)))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
@pytest.mark.parametrize("distance", ["euclidean", "squared", "cosine"])
@pytest.mark.parametrize("setting", ["items", "gallery", "cameras", "gallery and cameras"])
def test_retrieval_scores_match_brute_force_and_the_single_measures(seed, chunk_size, distance, setting):
    brute = "cosine" if distance == "cosine" else "euclidean"
    kw = dict(distance=distance, chunk_size=chunk_size)
    references = cameras = None
    if "gallery" in setting:
        (x, y), (gx, gy) = query_and_gallery(seed)
        kw.update(ref_embeddings=gx, ref_labels=gy)
        references = (gx, gy)
        if "cameras" in setting:
            cameras = (with_cameras(seed, len(y)), with_cameras(seed + 50, len(gy)))
            cameras[0][0] = cameras[1][0]  # query 0 is a copy of gallery item 0, in its camera
            kw.update(cameras=cameras[0], ref_cameras=cameras[1])
    else:
        rnd = random.Random(seed)
        x, y = random_data(seed, n=rnd.randint(30, 70), dim=rnd.randint(2, 6),
                           classes=rnd.randint(2, 6), singletons=2)
        if "cameras" in setting:
            cameras = with_cameras(seed, len(y))
            kw.update(cameras=cameras)
    recall, full = brute_force(x, y, KS, brute, references=references, cameras=cameras, full=True)
    _, minp = brute_force(x, y, KS, brute, references=references, cameras=cameras, penalty=True)
    queries = counted_queries(y, None if references is None else references[1], cameras)
    assert 0 < queries < len(y), "some queries should be skipped here"

    got = retrieval_scores(x, y, KS, **kw)
    assert list(got.recall) == list(KS)
    assert got.recall == pytest.approx(recall, abs=1e-12)
    assert got.mean_average_precision == pytest.approx(full, abs=1e-12)
    assert got.mean_inverse_negative_penalty == pytest.approx(minp, abs=1e-12)
    assert got.queries == queries
    # The same ranking as the single measures', to the last bit.
    assert got.recall == recall_at_k(x, y, KS, **kw)
    assert got.mean_average_precision == mean_average_precision(x, y, **kw)
    assert got.mean_inverse_negative_penalty == mean_inverse_negative_penalty(x, y, **kw)


def test_retrieval_scores_of_tight_classes_far_from_the_centre():
    """Ranked as the single measures rank them: exactly, through the float64
    re-ranking where float32's rounding could change the order."""
    embeddings, labels = tight_classes_far_apart("euclidean", torch.float32)
    x, y, references = embeddings[60:], labels[60:], (embeddings[:60], labels[:60])
    kw = dict(ref_embeddings=references[0], ref_labels=references[1])
    recall, full = brute_force(x, y, (1, 5), references=references, full=True)
    _, minp = brute_force(x, y, (1, 5), references=references, penalty=True)
    got = retrieval_scores(x, y, (1, 5), **kw)
    assert got.recall == pytest.approx(recall, abs=1e-12)
    assert got.mean_average_precision == pytest.approx(full, abs=1e-12)
    assert got.mean_inverse_negative_penalty == pytest.approx(minp, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_retrieval_scores_in_half_precision(dtype):
    """Half-precision items are ranked in float32, against a brute force over
    their values in float64."""
    x, y = random_data(2, n=80, dim=4, classes=5, singletons=2, dtype=dtype)
    recall, full = brute_force(x, y, KS, full=True)
    _, minp = brute_force(x, y, KS, penalty=True)
    got = retrieval_scores(x, y, KS)
    assert got.recall == pytest.approx(recall, abs=1e-12)
    assert got.mean_average_precision == pytest.approx(full, abs=1e-12)
    assert got.mean_inverse_negative_penalty == pytest.approx(minp, abs=1e-12)


def tied_data(kind: str, seed: int):
    """Embeddings whose distances tie, with 5 labels: small integers, binary
    codes, copies of 12 points, a collapsed model (all equal), and integers
    offset by 1000.1 in float32 (or float64), whose centred Gram products
    round (ties the core ranks again in float64, or from differences)."""
    g = torch.Generator().manual_seed(seed)
    n = 60
    labels = torch.randint(0, 5, (n,), generator=g)
    if kind == "integers":
        x = torch.randint(0, 3, (n, 2), generator=g).double()
    elif kind == "binary codes":
        x = torch.sign(torch.randn(5, 8, generator=g)[labels] + 1.5 * torch.randn(n, 8, generator=g))
    elif kind == "copies":
        x = torch.randn(12, 4, generator=g, dtype=torch.float64)[torch.randint(0, 12, (n,), generator=g)]
    elif kind == "collapsed":
        x = torch.randn(1, 4, generator=g).repeat(n, 1)
    else:
        # Exact sums: 1000.1 and 1002.1 have the same exponent.
        if kind == "offset integers":
            offset = float(torch.tensor(1000.1, dtype=torch.float32))
            x = (torch.randint(0, 3, (n, 3), generator=g).double() + offset).float()
        else:
            x = torch.randint(0, 3, (n, 3), generator=g).double() + 1000.1
    return x, labels


TIED = ["integers", "binary codes", "copies", "collapsed", "offset integers",
        "offset integers in float64"]


@pytest.mark.parametrize("kind", TIED)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("setting", ["items", "gallery", "cameras"])
def test_tied_distances_rank_other_labels_first(kind, seed, chunk_size, setting):
    """Where distances tie, the items of other labels rank first, as in the
    brute force: every measure then equals it exactly, whatever k cuts
    through a run of ties, and retrieval_scores equals the single functions."""
    x, y = tied_data(kind, seed)
    kw = dict(chunk_size=chunk_size)
    references = cameras = None
    if setting == "gallery":
        x, y, references = x[:20], y[:20], (x[20:], y[20:])
        kw.update(ref_embeddings=references[0], ref_labels=references[1])
    elif setting == "cameras":
        cameras = with_cameras(seed, len(y))
        kw.update(cameras=cameras)
    ks = (1, 2, 5, 13)
    recall, map_at_r = brute_force(x, y, ks, references=references, cameras=cameras)
    _, full = brute_force(x, y, ks, references=references, cameras=cameras, full=True)
    _, minp = brute_force(x, y, ks, references=references, cameras=cameras, penalty=True)
    assert recall_at_k(x, y, ks, **kw) == pytest.approx(recall, abs=1e-12)
    assert mean_average_precision_at_r(x, y, **kw) == pytest.approx(map_at_r, abs=1e-12)
    assert mean_average_precision(x, y, **kw) == pytest.approx(full, abs=1e-12)
    assert mean_inverse_negative_penalty(x, y, **kw) == pytest.approx(minp, abs=1e-12)
    got = retrieval_scores(x, y, ks, **kw)
    assert got.recall == recall_at_k(x, y, ks, **kw)
    assert got.mean_average_precision == mean_average_precision(x, y, **kw)
    assert got.mean_inverse_negative_penalty == mean_inverse_negative_penalty(x, y, **kw)


@pytest.mark.parametrize("kind", TIED)
def test_tied_distances_do_not_depend_on_the_items_order(kind):
    x, y = tied_data(kind, 0)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    ks = (1, 3, 10)
    # Equal but for the order of the sums over queries.
    a, b = retrieval_scores(x[perm], y[perm], ks), retrieval_scores(x, y, ks)
    assert a.recall == b.recall and a.queries == b.queries
    assert a.mean_average_precision == pytest.approx(b.mean_average_precision, abs=1e-12)
    assert a.mean_inverse_negative_penalty == pytest.approx(b.mean_inverse_negative_penalty, abs=1e-12)
    assert mean_average_precision_at_r(x[perm], y[perm]) == pytest.approx(
        mean_average_precision_at_r(x, y), abs=1e-12)


def test_a_collapsed_model_scores_as_the_worst_order_of_its_ties():
    """All embeddings equal: every query's other items tie, and with those of
    other labels first no query finds its label within the first k while
    more than k items of other labels remain."""
    x, y = tied_data("collapsed", 0)
    others = (y[:, None] != y[None]).sum(1)
    got = retrieval_scores(x, y, (1, 10))
    assert got.recall[1] == 0.0 and got.recall[10] == ((others < 10).sum() / len(y)).item()
    assert mean_average_precision_at_r(x, y) == 0.0


@pytest.mark.parametrize("case", ["cosine sign codes", "cosine sign codes of two norms",
                                  "sign codes times 1000.1 in float64"])
def test_ties_ranked_again_stay_ties_whatever_coordinates_hold_them(case):
    """Found by review: where tied distances were ranked again from the
    embeddings' differences, a vectorised sum of the same terms in other
    coordinates rounded differently, so the relevant item could win a tie and
    the scores changed with the order of the dimensions."""
    q = [1.0] * 8
    if case.startswith("cosine sign codes"):
        a = [-1.0, 1, -1, -1, -1, 1, 1, -1]  # Hamming 5 from q, q's label
        b = [-1.0, 1, -1, -1, 1, -1, -1, 1]  # Hamming 5 from q, another label
        x, kw = torch.tensor([q, a, b]), dict(distance="cosine")
        if case.endswith("two norms"):
            # Ranked by the cosine distance, not as items of one norm.
            x[2] *= 2
    else:
        a = [-1.0, 1, -1, 1, -1, -1, 1, -1]
        b = [1.0, 1, 1, -1, -1, -1, -1, -1]
        x, kw = torch.tensor([q, a, b], dtype=torch.float64) * 1000.1, {}
    y = torch.tensor([0, 0, 1])
    brute = "cosine" if kw else "euclidean"
    recall, map_at_r = brute_force(x, y, (1,), brute)
    _, full = brute_force(x, y, (1,), brute, full=True)
    assert recall == {1: 0.0}
    for columns in (range(8), [4, 0, 7, 3, 2, 5, 1, 6], range(7, -1, -1)):
        xc = x[:, list(columns)]
        assert recall_at_k(xc, y, 1, **kw) == pytest.approx(recall, abs=1e-12)
        assert mean_average_precision_at_r(xc, y, **kw) == pytest.approx(map_at_r, abs=1e-12)
        assert retrieval_scores(xc, y, 1, **kw).mean_average_precision == pytest.approx(full, abs=1e-12)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_random_sign_codes_do_not_depend_on_the_order_of_the_dimensions(distance):
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 5, (60,), generator=g)
    x = torch.sign(torch.randn(60, 24, generator=g, dtype=torch.float64))
    x = x if distance == "cosine" else x * 1000.1
    brute = brute_force(x, y, (1, 3), distance)
    for seed in range(3):
        columns = torch.randperm(24, generator=torch.Generator().manual_seed(seed))
        got = recall_at_k(x[:, columns], y, (1, 3), distance=distance)
        assert got == pytest.approx(brute[0], abs=1e-12)
        assert mean_average_precision_at_r(x[:, columns], y, distance=distance) == pytest.approx(
            brute[1], abs=1e-12)


def _codes(kind, n, generator):
    labels = torch.randint(0, 5, (n,), generator=generator)
    if kind.startswith("sign codes"):
        dim = int(kind.split()[-1])
        centres = torch.randn(5, dim, generator=generator)
        x = torch.sign(centres[labels] + 1.2 * torch.randn(n, dim, generator=generator))
    else:
        # Three of 12 bits set, around one pattern per label.
        scores = torch.rand(5, 12, generator=generator)[labels] + torch.rand(n, 12, generator=generator)
        x = torch.zeros(n, 12).scatter_(1, scores.topk(3, dim=1).indices, 1.0)
    return x, labels


@pytest.mark.parametrize("kind", ["sign codes of 8", "sign codes of 16", "sign codes of 48", "3-hot codes"])
@pytest.mark.parametrize("setting", ["items", "cameras"])
def test_cosine_ties_of_codes_of_one_norm(kind, setting):
    """Items of one norm rank by the cosine distance as by the squared
    Euclidean one, whose Gram products do not round for codes: their ties
    stay ties, other labels first, as in the brute force, whether or not the
    normalised codes round (the norm of 8 or 48 signs is not a power of two),
    and as when the rows are scaled by powers of two, of differing norms,
    ranked by the cosine distance."""
    g = torch.Generator().manual_seed(7)
    x, y = _codes(kind, 60, g)
    kw = dict(distance="cosine")
    cameras = None
    if setting == "cameras":
        cameras = with_cameras(1, len(y))
        kw.update(cameras=cameras)
    ks = (1, 3, 10)
    recall, map_at_r = brute_force(x, y, ks, "cosine", cameras=cameras)
    _, full = brute_force(x, y, ks, "cosine", cameras=cameras, full=True)
    _, minp = brute_force(x, y, ks, "cosine", cameras=cameras, penalty=True)
    scaled = x * 2.0 ** torch.randint(-3, 4, (len(y), 1), generator=g)
    for embeddings in (x, scaled):
        got = retrieval_scores(embeddings, y, ks, **kw)
        assert got.recall == pytest.approx(recall, abs=1e-12)
        assert got.mean_average_precision == pytest.approx(full, abs=1e-12)
        assert got.mean_inverse_negative_penalty == pytest.approx(minp, abs=1e-12)
        assert mean_average_precision_at_r(embeddings, y, **kw) == pytest.approx(map_at_r, abs=1e-12)


@pytest.mark.parametrize("scale", [2.0 ** -700, 2.0 ** -1000, 2.0 ** 400])
def test_cosine_scores_do_not_depend_on_the_scale_of_the_items(scale):
    """Found by review: items of one norm were recognised by squared norms
    that underflowed to 0 for tiny float64 rows, all "equal", and those were
    then ranked as by the squared Euclidean distance (recall@1 0.25 for 0.5)."""
    x = torch.tensor([[1.0, 0.0], [8.0, 6.0], [1.0, 1.0], [0.0, 9.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    recall, map_at_r = brute_force(x, y, (1,), "cosine")
    _, full = brute_force(x, y, (1,), "cosine", full=True)
    assert recall_at_k(x * scale, y, 1, distance="cosine") == pytest.approx(recall, abs=1e-12)
    assert mean_average_precision_at_r(x * scale, y, distance="cosine") == pytest.approx(map_at_r, abs=1e-12)
    assert mean_average_precision(x * scale, y, distance="cosine") == pytest.approx(full, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cosine_ties_of_parallel_rows_of_different_norms(dtype):
    """Found by review: b = 6a is parallel to a, so from q they tie and the
    item of the other label (b) ranks first; normalising a and b in float64
    rounded them apart and a ranked first (recall@1 0.5 for 0). Each row is
    now divided by its largest entry first, which makes a and b one row."""
    x = torch.tensor([[1.0, 1.0], [-5.0, -1.0], [-30.0, -6.0], [1.0, -7.0], [7.0, -49.0]], dtype=dtype)
    y = torch.tensor([0, 0, 1, 2, 2])
    ks = (1, 2)
    recall, map_at_r = brute_force(x, y, ks, "cosine")
    _, full = brute_force(x, y, ks, "cosine", full=True)
    _, minp = brute_force(x, y, ks, "cosine", penalty=True)
    got = retrieval_scores(x, y, ks, distance="cosine")
    assert got.recall == pytest.approx(recall, abs=1e-12)
    assert got.mean_average_precision == pytest.approx(full, abs=1e-12)
    assert got.mean_inverse_negative_penalty == pytest.approx(minp, abs=1e-12)
    assert mean_average_precision_at_r(x, y, distance="cosine") == pytest.approx(map_at_r, abs=1e-12)


@pytest.mark.parametrize("kind", ["0/1 codes of several weights", "small integers with zero rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_cosine_ties_of_integer_rows_of_different_norms(kind, dtype, chunk_size):
    """Found by review: under the cosine distance, rows of different norms
    whose cosines are equal (0/1 codes of weights 1 and 4 against 2 and 2, a
    zero row and an orthogonal one) were ordered by the rounding of their
    normalisation. Rows of small integers are now compared exactly, as
    fractions: checked against exact rational arithmetic."""
    g = torch.Generator().manual_seed(11)
    n = 70
    y = torch.randint(0, 6, (n,), generator=g)
    if kind.startswith("0/1"):
        x = (torch.rand(6, 10, generator=g)[y] + torch.rand(n, 10, generator=g) > 1.2).double()
    else:
        x = torch.randint(-2, 3, (n, 4), generator=g).double()
    x[torch.rand(n, generator=g) < 0.15] = 0
    x = x.to(dtype)
    ks = (1, 3, 10)
    recall, map_at_r = brute_force(x, y, ks, "exact cosine")
    _, full = brute_force(x, y, ks, "exact cosine", full=True)
    _, minp = brute_force(x, y, ks, "exact cosine", penalty=True)
    kw = dict(distance="cosine", chunk_size=chunk_size)
    got = retrieval_scores(x, y, ks, **kw)
    assert got.recall == pytest.approx(recall, abs=1e-12)
    assert got.mean_average_precision == pytest.approx(full, abs=1e-12)
    assert got.mean_inverse_negative_penalty == pytest.approx(minp, abs=1e-12)
    assert recall_at_k(x, y, ks, **kw) == pytest.approx(recall, abs=1e-12)
    assert mean_average_precision_at_r(x, y, **kw) == pytest.approx(map_at_r, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("setting", ["items", "gallery", "cameras"])
def test_cosine_copies_tie_with_the_other_rows_of_their_direction(dtype, chunk_size, setting):
    """Found by review: under the cosine distance a copy of the query and a
    distinct row of its direction (v, v and 6v) are all at 0, tied, yet the
    copies ranked ahead of every distinct item, so that a copy of the query's
    label beat a parallel row of another (recall@1 1.0 for 0.0). Rows of
    one direction now tie as copies do, checked against exact rational
    arithmetic, with scales that are not powers of two."""
    g = torch.Generator().manual_seed(5)
    n = 64
    directions = torch.randint(-2, 3, (6, 3), generator=g).double()
    directions[directions.abs().sum(1) == 0] = 1.0
    scales = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 1.5, 10.0], dtype=torch.float64)
    x = (directions[torch.randint(0, 6, (n,), generator=g)]
         * scales[torch.randint(0, len(scales), (n, 1), generator=g)]).to(dtype)
    y = torch.randint(0, 4, (n,), generator=g)
    kw = dict(distance="cosine", chunk_size=chunk_size)
    references = cameras = None
    if setting == "gallery":
        x, y, references = x[:24], y[:24], (x[24:], y[24:])
        kw.update(ref_embeddings=references[0], ref_labels=references[1])
    elif setting == "cameras":
        cameras = with_cameras(2, n)
        kw.update(cameras=cameras)
    ks = (1, 2, 7)
    recall, map_at_r = brute_force(x, y, ks, "exact cosine", references=references, cameras=cameras)
    _, full = brute_force(x, y, ks, "exact cosine", references=references, cameras=cameras, full=True)
    _, minp = brute_force(x, y, ks, "exact cosine", references=references, cameras=cameras,
                          penalty=True)
    got = retrieval_scores(x, y, ks, **kw)
    assert got.recall == pytest.approx(recall, abs=1e-12)
    assert got.mean_average_precision == pytest.approx(full, abs=1e-12)
    assert got.mean_inverse_negative_penalty == pytest.approx(minp, abs=1e-12)
    assert mean_average_precision_at_r(x, y, **kw) == pytest.approx(map_at_r, abs=1e-12)


@pytest.mark.parametrize("kind", ["multi-hot", "ternary"])
@pytest.mark.parametrize("scaling", ["normalised", "times 0.1", "times 1e4 and 3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("setting", ["items", "gallery"])
def test_cosine_ties_of_codes_scaled_row_by_row(kind, scaling, dtype, setting):
    """Found by review: codes times a factor of their own row (normalised
    multi-hot or ternary codes, codes times 0.1) are exactly parallel to the
    codes, so their cosine distances tie as the codes' do; they were not
    recognised as codes and their ties broke by rounding, always upward
    (recall@1 0.5 for 0 on three normalised 0/1 codes, in 40 of 40 random
    cases). Checked against exact rational arithmetic on the values given."""
    g = torch.Generator().manual_seed(13)
    n, dim = 48, 6
    y = torch.randint(0, 4, (n,), generator=g)
    if kind == "multi-hot":
        x = (torch.rand(n, dim, generator=g) < 0.4).double()
    else:
        x = torch.randint(-1, 2, (n, dim), generator=g).double()
    x[x.abs().sum(1) == 0, 0] = 1.0
    if scaling == "normalised":
        x = torch.nn.functional.normalize(x.to(dtype), dim=1)
    elif scaling == "times 0.1":
        x = (x * 0.1).to(dtype)
    else:
        factors = torch.where(torch.rand(n, 1, generator=g) < 0.5, 1e4, 3.0)
        x = (x * factors).to(dtype)
    kw = dict(distance="cosine")
    references = None
    if setting == "gallery":
        x, y, references = x[:16], y[:16], (x[16:], y[16:])
        kw.update(ref_embeddings=references[0], ref_labels=references[1])
    ks = (1, 2, 5)
    recall, map_at_r = brute_force(x, y, ks, "exact cosine", references=references)
    _, full = brute_force(x, y, ks, "exact cosine", references=references, full=True)
    _, minp = brute_force(x, y, ks, "exact cosine", references=references, penalty=True)
    got = retrieval_scores(x, y, ks, **kw)
    assert got.recall == pytest.approx(recall, abs=1e-12)
    assert got.mean_average_precision == pytest.approx(full, abs=1e-12)
    assert got.mean_inverse_negative_penalty == pytest.approx(minp, abs=1e-12)
    assert mean_average_precision_at_r(x, y, **kw) == pytest.approx(map_at_r, abs=1e-12)


def test_cosine_directions_closer_than_float32_rounds_are_not_copies():
    """Found by review of 9371fe4: the tie rows divided in float32 merged two
    directions whose quotients round to one float32 row, tying a row at
    1 - cos^2 = 2.7e-16 with one at 9e-17 (recall@1 0.0 for 1.0). Divided in
    float64, float32 input ranks as the same values in float64 do."""
    x = torch.tensor([[0.005859375, 0.0078125],
                      [0.003424482187256217, 0.004565976094454527],
                      [23.867172241210938, 31.82289695739746]])
    y = torch.tensor([1, 0, 1])
    recall, map_at_r = brute_force(x, y, (1,), "exact cosine")
    assert recall == {1: 1.0}
    for embeddings in (x, x.double()):
        assert recall_at_k(embeddings, y, 1, distance="cosine") == recall
        assert mean_average_precision_at_r(embeddings, y, distance="cosine") == map_at_r


def test_cosine_copy_and_parallel_row_of_another_label_tie():
    """The review's case: (0, -1) of label 0, and two copies of (0, -2) of
    label 1, all at cosine distance 0; each copy's nearest is, with other
    labels first among ties, the row of label 0."""
    x = torch.tensor([[0.0, -1.0], [0.0, -2.0], [0.0, -2.0]])
    y = torch.tensor([0, 1, 1])
    got = retrieval_scores(x, y, (1,), distance="cosine")
    assert got.recall == {1: 0.0}
    assert got.mean_average_precision == 0.5 and got.mean_inverse_negative_penalty == 0.5
    assert mean_average_precision_at_r(x, y, distance="cosine") == 0.0


def test_cosine_of_zero_rows_ties_every_item_at_one():
    """Zero rows have one norm, 0, but are at 1 from every item under the
    cosine distance, not at 0 from each other as the squared Euclidean
    distance would put them."""
    x = torch.zeros(6, 3)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    recall, map_at_r = brute_force(x, y, (1, 4), "cosine")
    assert recall == {1: 0.0, 4: 0.0}
    assert recall_at_k(x, y, (1, 4), distance="cosine") == pytest.approx(recall, abs=1e-12)
    assert mean_average_precision_at_r(x, y, distance="cosine") == pytest.approx(map_at_r, abs=1e-12)


def test_tied_float32_distances_that_round_are_ranked_again():
    """Integers offset by 1000.1 in float32 tie exactly, but their centred Gram
    products round: the ties are ranked again in float64, still other labels
    first."""
    x, y = tied_data("offset integers", 2)
    with _Float64Ranking() as ranking:
        got = recall_at_k(x, y, (1, 2))
    assert ranking.seen
    recall, _ = brute_force(x, y, (1, 2))
    assert got == pytest.approx(recall, abs=1e-12)


def test_retrieval_scores_defaults_and_result():
    x, y = random_data(0, n=60, dim=3, classes=4)
    got = retrieval_scores(x, y)
    assert list(got.recall) == [1, 5, 10]
    assert got == (got.recall, got.mean_average_precision, got.mean_inverse_negative_penalty, got.queries)
    assert retrieval_scores(x, y, ks=3).recall == recall_at_k(x, y, ks=3)
    assert retrieval_scores(x, y, ks=torch.tensor([2, 1])).recall == recall_at_k(x, y, ks=(2, 1))


def test_retrieval_scores_errors():
    (x, y), (gx, gy) = query_and_gallery(0)
    cases = [
        (dict(ks=()), "ks: must hold at least one k"),
        (dict(ks=(1, 0)), "ks: every k must be an int >= 1"),
        (dict(ks="1"), "ks: must be a sequence of positive ints"),
        (dict(distance="l1"), "distance: expected one of"),
        (dict(chunk_size=0), "chunk_size: must be None or an int >= 1"),
        (dict(ref_embeddings=gx), "ref_embeddings and ref_labels: must be given together"),
        (dict(ref_embeddings=x, ref_labels=y), "ref_embeddings: is embeddings itself"),
        (dict(cameras=with_cameras(0, 3)), "cameras: has 3 entries but embeddings has"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            retrieval_scores(x, y, **kw)
    with pytest.raises(ValueError, match="labels: no item shares its label"):
        retrieval_scores(x, torch.arange(len(y)))
    with pytest.raises(ValueError, match="embeddings: must be floating point"):
        retrieval_scores(x.long(), y)
