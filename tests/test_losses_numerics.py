"""Numerical behaviour: degenerate batches, NaN / Inf, zero distances,
reduced precision, label dtypes, and memory on a large batch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

import online_triplet_loss
import reference as R
from conftest import REPO_ROOT, make_batch
from helpers import DISTANCES, LOSSES, function_loss, grad_of, leaf, make_module
from online_triplet_loss import losses

MINING_SOFT = [(m, s) for m in LOSSES for s in ((False, True) if m == "hard" else (False,))]
MS_IDS = [m + ("-soft" if s else "") for m, s in MINING_SOFT]


# ------------------------------------------------------------ degenerate batches


def _degenerate_batches():
    g = torch.Generator().manual_seed(0)
    return {
        "empty": (torch.zeros(0, dtype=torch.long), torch.randn(0, 5, generator=g)),
        "single": (torch.tensor([3]), torch.randn(1, 5, generator=g)),
        "one_class": (torch.full((7,), 2), torch.randn(7, 5, generator=g)),
        "all_distinct": (torch.arange(7) * 3, torch.randn(7, 5, generator=g)),
        "one_class_duplicates": (torch.zeros(4, dtype=torch.long), torch.ones(4, 5)),
    }


DEGENERATE = _degenerate_batches()


@pytest.mark.parametrize("name", list(DEGENERATE))
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining,soft", MINING_SOFT, ids=MS_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_degenerate_batch_is_exactly_zero(name, distance, mining, soft, dtype):
    labels, emb = DEGENERATE[name]
    for api in ("function", "module"):
        x = leaf(emb.to(dtype))
        if api == "function":
            loss = function_loss(mining, labels, x, 0.5, distance, soft)
        else:
            loss = make_module(mining, 0.5, distance, soft)(x, labels)
        assert loss.dtype == dtype and loss.shape == ()
        assert loss.item() == 0.0, f"{api}: {loss.item()}"
        loss.backward()
        assert x.grad is not None and x.grad.shape == x.shape
        assert torch.isfinite(x.grad).all()
        assert (x.grad == 0).all()
    if mining == "all":
        _, fraction = online_triplet_loss.batch_all_triplet_loss(labels, emb.to(dtype), 0.5,
                                                                 distance=distance)
        assert fraction.item() == 0.0
    s, c, v = losses.terms(mining, labels, emb.to(dtype), 0.5, distance=distance, soft=soft)
    assert s.item() == 0.0 and int(c) == 0


@pytest.mark.parametrize("mining,soft", MINING_SOFT, ids=MS_IDS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_empty_reference_set_is_zero(mining, soft, distance):
    labels, emb = torch.tensor([0, 0, 1]), torch.randn(3, 4)
    x, y = leaf(emb), leaf(torch.zeros(0, 4))
    loss = function_loss(mining, labels, x, 0.5, distance, soft,
                         ref_embeddings=y, ref_labels=torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    gx, gy = grad_of(loss, x, y)
    assert (gx == 0).all() and gy.shape == (0, 4)


@pytest.mark.parametrize("mining,soft", MINING_SOFT, ids=MS_IDS)
def test_empty_anchors_with_reference_set_is_zero(mining, soft):
    x, y = leaf(torch.zeros(0, 4)), leaf(torch.randn(5, 4))
    loss = function_loss(mining, torch.zeros(0, dtype=torch.long), x, 0.5, "euclidean", soft,
                         ref_embeddings=y, ref_labels=torch.tensor([0, 0, 1, 1, 2]))
    assert loss.item() == 0.0
    gx, gy = grad_of(loss, x, y)
    assert (gy == 0).all()


# ----------------------------------------------------------------- NaN and Inf


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["used", "singleton", "one_class", "reference"])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining,soft", MINING_SOFT, ids=MS_IDS)
def test_nan_or_inf_in_embeddings_gives_nan(bad, where, distance, mining, soft):
    """A NaN or Inf anywhere in the inputs makes the loss NaN, even when no
    triplet uses the bad sample."""
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 7])  # sample 6 is a singleton class
    emb = torch.randn(7, 4, generator=torch.Generator().manual_seed(1))
    kw = {}
    if where == "used":
        emb[2, 1] = bad
    elif where == "singleton":
        emb[6, 3] = bad
    elif where == "one_class":  # no triplet at all
        labels = torch.zeros(7, dtype=torch.long)
        emb[4, 0] = bad
    else:
        ref = torch.randn(3, 4)
        ref[2, 2] = bad
        kw = dict(ref_embeddings=ref, ref_labels=torch.tensor([0, 1, 9]))
    for api in ("function", "module"):
        x = leaf(emb)
        if api == "function":
            loss = function_loss(mining, labels, x, 0.3, distance, soft, **kw)
        else:
            loss = make_module(mining, 0.3, distance, soft)(x, labels, **kw)
        assert torch.isnan(loss), f"{api}: {loss}"
        loss.backward()  # must not raise


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nan_in_half_embeddings_gives_nan(dtype):
    labels = torch.tensor([0, 0, 1, 1, 5])
    emb = torch.randn(5, 3).to(dtype)
    emb[4, 0] = float("nan")
    for mining, soft in MINING_SOFT:
        loss = function_loss(mining, labels, emb, 0.3, "euclidean", soft)
        assert loss.dtype == dtype and torch.isnan(loss)


# --------------------------------------------------------------- zero distances


def _duplicate_inputs():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=g)
    pairs = base.clone()
    pairs[1] = pairs[0]  # same class
    pairs[3] = pairs[2]  # same class
    pairs[4] = pairs[0]  # another class
    return {
        "all_identical": (torch.tensor([0, 0, 1, 1, 2, 2]), base[:1].repeat(6, 1)),
        "pairs": (torch.tensor([0, 0, 1, 1, 2, 2]), pairs),
        "zero_vectors": (torch.tensor([0, 0, 1, 1, 2, 2]), torch.cat([torch.zeros(3, 5), base[:3]])),
        "random_batch": (make_batch(501, duplicates=True).labels,
                         make_batch(501, duplicates=True).embeddings.float()),
    }


DUPLICATES = _duplicate_inputs()


DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _duplicate_cases():
    cases = []
    for name in DUPLICATES:
        for dtype in DTYPE_IDS:
            for distance in DISTANCES:
                if name == "zero_vectors" and distance == "cosine" and dtype == torch.float16:
                    # Not a zero-distance case: a zero vector is at cosine
                    # distance 1 from everything, and with F.normalize's
                    # convention x / max(|x|, 1e-12) its gradient is g / 1e-12,
                    # beyond float16's range (65504) by definition.
                    continue
                cases.append(pytest.param(name, dtype, distance,
                                          id=f"{name}-{DTYPE_IDS[dtype]}-{distance}"))
    return cases


@pytest.mark.parametrize("name,dtype,distance", _duplicate_cases())
@pytest.mark.parametrize("mining,soft", MINING_SOFT, ids=MS_IDS)
def test_duplicate_embeddings_have_finite_gradients(name, dtype, distance, mining, soft):
    labels, emb = DUPLICATES[name]
    for margin in (0.0, 0.5):
        x = leaf(emb.to(dtype))
        loss = function_loss(mining, labels, x, margin, distance, soft)
        assert loss.dtype == dtype
        assert torch.isfinite(loss), loss
        loss.backward()
        assert x.grad.dtype == dtype
        assert torch.isfinite(x.grad).all(), x.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("distance", DISTANCES)
def test_all_identical_embeddings_values(dtype, distance):
    """All rows equal (a collapsed model): all distances are equal, so
    batch-all's triplets all have loss exactly m; batch-hard gives relu(m) /
    softplus(m); semi-hard finds no negative farther than the positive and
    takes the largest: m. With m = 0 no triplet is positive."""
    labels, emb = DUPLICATES["all_identical"]
    e = emb.to(dtype)
    loss, frac = online_triplet_loss.batch_all_triplet_loss(labels, e, 0.5, distance=distance)
    assert math.isclose(loss.item(), 0.5, rel_tol=1e-6) and frac.item() == 1.0
    hard = online_triplet_loss.batch_hard_triplet_loss(labels, e, 0.5, distance=distance)
    assert math.isclose(hard.item(), 0.5, rel_tol=1e-6)
    soft = online_triplet_loss.batch_hard_triplet_loss(labels, e, 0.5, distance=distance, soft=True)
    assert math.isclose(soft.item(), math.log1p(math.exp(0.5)), rel_tol=1e-6)
    semi = online_triplet_loss.batch_semihard_triplet_loss(labels, e, 0.5, distance=distance)
    assert math.isclose(semi.item(), 0.5, rel_tol=1e-6)
    loss0, frac0 = online_triplet_loss.batch_all_triplet_loss(labels, e, 0.0, distance=distance)
    assert (loss0.item(), frac0.item()) == (0.0, 0.0), "margin 0: (loss, fraction) should be (0, 0)"


# ----------------------------------------------------------- reduced precision


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)], ids=["f16", "bf16"])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining,soft", MINING_SOFT, ids=MS_IDS)
def test_half_precision_matches_float32(dtype, rtol, distance, mining, soft):
    for seed in (20, 21, 22):
        b = make_batch(seed, min_size=10, dim=6)
        xh = leaf(b.embeddings.to(dtype))
        x32 = leaf(xh.detach().float())  # the same values in float32
        lh = function_loss(mining, b.labels, xh, 0.3, distance, soft)
        l32 = function_loss(mining, b.labels, x32, 0.3, distance, soft)
        assert lh.dtype == dtype and lh.shape == ()
        torch.testing.assert_close(lh.float(), l32.detach(), rtol=rtol, atol=1e-3)
        m = make_module(mining, 0.3, distance, soft)(xh.detach(), b.labels)
        assert m.dtype == dtype
        (gh,) = grad_of(lh, xh)
        (g32,) = grad_of(l32, x32)
        assert gh.dtype == dtype
        # relative to the gradient's scale: a zeroed or halved gradient fails
        torch.testing.assert_close(gh.float(), g32, rtol=4 * rtol, atol=4 * rtol * g32.abs().max().item())
        if mining == "all":
            loss, frac = online_triplet_loss.batch_all_triplet_loss(b.labels, xh.detach(), 0.3,
                                                                    distance=distance)
            assert frac.dtype == dtype


# ---------------------------------------------------------------- label dtypes


INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _all_outputs(labels, emb, distance):
    """Every loss (and the batch-all fraction) with their gradients."""
    out = []
    for mining, soft in MINING_SOFT:
        x = leaf(emb)
        if mining == "all":
            loss, frac = online_triplet_loss.batch_all_triplet_loss(labels, x, 0.3, distance=distance)
            out.append(frac.detach())
        else:
            loss = function_loss(mining, labels, x, 0.3, distance, soft)
        out.append(loss.detach())
        out.extend(grad_of(loss, x))
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("dtype", INT_DTYPES + FLOAT_DTYPES + [torch.bool], ids=str)
@pytest.mark.parametrize("distance", DISTANCES)
def test_label_dtypes_match_int64(dtype, distance):
    for seed in (30, 31, 32):
        b = make_batch(seed, min_size=8)
        # class ids that every dtype holds exactly
        if dtype == torch.bool:
            ids = (b.labels % 2).to(torch.long)
        else:
            _, ids = torch.unique(b.labels, return_inverse=True)
            ids = ids * 3 % 120
        expected = _all_outputs(ids, b.embeddings, distance)
        got = _all_outputs(ids.to(dtype), b.embeddings, distance)
        _assert_same(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_float_labels_are_compared_by_value(dtype):
    """1.5 and 1.0 are different classes; -0.0 and 0.0 the same one."""
    b = make_batch(33, min_size=12, max_size=12)
    float_ids = torch.tensor([1.0, 1.5, 1.0, 1.5, -0.0, 0.0, 2.5, 1.0, 2.5, 0.0, 1.5, 7.0], dtype=dtype)
    int_ids = torch.tensor([1, 2, 1, 2, 0, 0, 3, 1, 3, 0, 2, 7])
    for distance in DISTANCES:
        expected = _all_outputs(int_ids, b.embeddings, distance)
        _assert_same(_all_outputs(float_ids, b.embeddings, distance), expected)
        # sanity: merging 1.5 into 1.0 (truncation) would give another result
        truncated = _all_outputs(float_ids.trunc(), b.embeddings, distance)
        assert any(not torch.equal(u, v) for u, v in zip(truncated, expected))


def test_float_labels_against_reference():
    b = make_batch(34, min_size=15)
    labels = (b.labels % 4).double() / 2 + 0.25  # 0.25, 0.75, 1.25, 1.75
    for mining, soft in MINING_SOFT:
        got = function_loss(mining, labels, b.embeddings, 0.4, "euclidean", soft)
        exp = R.reference_terms(mining, labels, b.embeddings, 0.4, "euclidean", soft=soft).loss
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-10)


def test_reference_labels_may_have_another_dtype():
    b = make_batch(35, min_size=10, dim=4)
    rl = torch.tensor([0, 1, 2, 0, 1], dtype=torch.int8)
    remb = torch.randn(5, 4, dtype=torch.float64)
    for mining, soft in MINING_SOFT:
        labels = b.labels % 3
        a = function_loss(mining, labels, b.embeddings, 0.4, "euclidean", soft,
                          ref_embeddings=remb, ref_labels=rl)
        c = function_loss(mining, labels.to(torch.int32), b.embeddings, 0.4, "euclidean", soft,
                          ref_embeddings=remb, ref_labels=rl.to(torch.int64))
        assert torch.equal(a, c)
        exp = R.reference_terms(mining, labels, b.embeddings, 0.4, "euclidean", soft=soft,
                                ref_embeddings=remb, ref_labels=rl).loss
        torch.testing.assert_close(a, exp, rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------------- large batch


_LARGE_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    torch.set_num_threads(1)
    import online_triplet_loss as otl
    from online_triplet_loss import losses
    data = torch.load(sys.argv[1])
    labels, emb = data["labels"], data["embeddings"]
    # warm up the code paths on a small batch so lazy initialisation is not counted
    otl.batch_all_triplet_loss(labels[:50], emb[:50].clone().requires_grad_(True), 0.2)[0].backward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    x = emb.clone().requires_grad_(True)
    s, c, v = losses.terms("all", labels, x, 0.2)
    s.backward()
    out = {"sum": s.item(), "count": int(c), "valid": int(v),
           "grad_finite": bool(torch.isfinite(x.grad).all()), "seconds": time.time() - t0}
    for mining in ("hard", "semihard"):
        x = emb.clone().requires_grad_(True)
        s2, _, _ = losses.terms(mining, labels, x, 0.2)
        s2.backward()
    out["peak_increase_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps(out))
    """
)


def test_large_batch_all_has_no_cubic_memory(tmp_path):
    """B = 1500, D = 8: a B^3 float tensor would take 13.5 GB (a bool mask
    3.4 GB). The run must stay far below that, and match a brute force."""
    n, d = 1500, 8
    g = torch.Generator().manual_seed(77)
    labels = torch.randint(0, 100, (n,), generator=g)
    emb = torch.randn(n, d, generator=g, dtype=torch.float64)
    path = tmp_path / "large.pt"
    torch.save({"labels": labels, "embeddings": emb}, path)
    proc = subprocess.run([sys.executable, "-c", _LARGE_SCRIPT, str(path)], capture_output=True,
                          text=True, timeout=240, cwd=str(REPO_ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["grad_finite"]
    # B^2 float64 matrices are 18 MB; allow a handful of them.
    assert out["peak_increase_kib"] < 400 * 1024, out

    total, count, valid = R.batch_all_vectorized_per_anchor(labels, emb, 0.2)
    assert out["valid"] == valid
    assert out["count"] == count
    assert math.isclose(out["sum"], total, rel_tol=1e-10)


@pytest.mark.parametrize("chunk_size", [None, 1], ids=["chunked", "half-matrix"])
@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("distance", ["euclidean", "squared"])
@pytest.mark.parametrize("mining", LOSSES)
def test_embeddings_on_a_grid_keep_their_exact_ties(mining, distance, dtype, portable, chunk_size):
    """Small-integer embeddings (quantised, binary, toy data) have exactly tied
    distances, and whether a triplet's hinge is 0 decides batch-all's count.
    The centre Euclidean distances are taken from keeps such data on a grid,
    so the distances, the ties and the counts are exact: equal to the float64
    reference by differences (the mean as centre rounded them: 4.000000000000002
    instead of 8 on sentence-transformers' own example, which gets 8)."""
    from online_triplet_loss import _core

    g = torch.Generator().manual_seed(5)
    for _ in range(25):
        labels = (torch.arange(18) % 6)[torch.randperm(18, generator=g)]
        x = torch.randint(-3, 4, (18, 3), generator=g).to(dtype)
        for margin in (0.0, 1.0):
            total, count, valid = _core.triplet_terms(mining, labels, x, margin, distance, False,
                                                      chunk_size=chunk_size, portable=portable)
            ref = R.reference_terms(mining, labels, x.double(), margin, distance)
            assert (count.item(), valid.item()) == (ref.count, ref.valid)
            # float32 rounds the square roots; the hinges then cancel.
            tol = 1e-5 if dtype == torch.float32 else 1e-13
            torch.testing.assert_close(total.double(), ref.sum, rtol=tol, atol=tol)


@pytest.mark.parametrize("chunk_size", [None, 1], ids=["chunked", "half-matrix"])
@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mining", LOSSES)
def test_cosine_parallel_rows_tie_as_copies(mining, dtype, portable, chunk_size):
    """Under the cosine distance v and 6v are at 0 from each other and at
    equal distances from every row, as copies are; computed, they came out
    about 1e-16 apart (a review: [3, 3] and its copy against a negative
    [1, 1] gave batch-all a hinge of 2.2e-16 at margin 0, counted as a
    positive triplet, so the mean over positive triplets halved; batch-hard
    gave 0). The reference gets each row divided by its largest magnitude,
    which leaves its cosine distances alone and makes parallel rows of
    small integers copies: their distances are then equal by construction
    (differences of equal rows)."""
    from online_triplet_loss import _core

    g = torch.Generator().manual_seed(11)
    for _ in range(20):
        directions = torch.randint(-64, 65, (5, 6), generator=g)
        rows = directions[torch.randint(0, 5, (16,), generator=g)]
        scales = torch.tensor([1, 2, 3, 5, 6])[torch.randint(0, 5, (16, 1), generator=g)]
        x = (rows * scales).to(dtype)
        labels = torch.randint(0, 4, (16,), generator=g)
        canonical = x.double() / x.double().abs().amax(1, keepdim=True)
        for margin in (0.0, 0.5):
            total, count, valid = _core.triplet_terms(mining, labels, x, margin, "cosine", False,
                                                      chunk_size=chunk_size, portable=portable)
            ref = R.reference_terms(mining, labels, canonical, margin, "cosine")
            assert (count.item(), valid.item()) == (ref.count, ref.valid)
            tol = 1e-6 if dtype == torch.float32 else 1e-13
            torch.testing.assert_close(total.double(), ref.sum, rtol=tol, atol=tol)
    # The review's batch: 0, not a count of rounding errors.
    x = torch.tensor([[3.0, 3.0], [3.0, 3.0], [1.0, 1.0]], dtype=dtype)
    total, count, _ = _core.triplet_terms(mining, torch.tensor([0, 0, 1]), x, 0.0, "cosine", False,
                                          chunk_size=chunk_size, portable=portable)
    assert total.item() == 0.0
    if mining == "all":  # batch-all's count is of positive triplets
        assert count.item() == 0


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cosine_batch_hard_of_a_parallel_positive_and_negative_is_the_margin(dtype, soft):
    """Batch-hard mines on the tied distances, then computes d_ap and d_an
    again for the gradient: of v and kv as given, normalised, they came out
    an ulp apart, so that z = d_ap − d_an was ±1e-16 instead of 0, with a
    full-size gradient at relu's kink (a review: 20 to 35 in 300 draws).
    They are computed from rows divided by their largest magnitude, which
    makes v and kv one row."""
    g = torch.Generator().manual_seed(2)
    labels, ref_labels = torch.tensor([0]), torch.tensor([0, 1])
    for _ in range(100):
        anchor = torch.randn(1, 5, generator=g, dtype=torch.float64).to(dtype)
        v = torch.randint(-50, 51, (5,), generator=g).to(dtype)
        k = float(torch.randint(2, 9, (1,), generator=g))
        refs = torch.stack([v, k * v])  # small integers: exactly parallel
        x, y = leaf(anchor), leaf(refs)
        loss = online_triplet_loss.batch_hard_triplet_loss(
            labels, x, 0.0, distance="cosine", soft=soft, ref_embeddings=y, ref_labels=ref_labels)
        gx, gy = torch.autograd.grad(loss, (x, y))
        if soft:  # log 2, slope ½ through d_ap − d_an: equal and opposite pulls
            assert loss.item() == pytest.approx(math.log(2), rel=1e-7 if dtype == torch.float32 else 1e-15)
            torch.testing.assert_close(gx, torch.zeros_like(gx), rtol=0, atol=1e-6)
        else:
            assert loss.item() == 0.0
            assert gx.abs().max().item() == 0.0 and gy.abs().max().item() == 0.0


def test_cosine_batch_hard_of_parallel_rows_at_the_norm_floor_is_the_margin():
    """As above, with v of norm within rounding of the cosine floor (1e-12):
    the side's float32 norm puts v above the floor, so that v and kv tie in
    the mining, where float64 put it below, and the rows that give d_ap and
    d_an took the float64 test, leaving v undivided: d_ap and d_an came out
    an ulp apart again (37 of these 180 draws had a loss above 0). They
    take the side's test now."""
    rows = [[-8.006829249097847e-13, -5.664952556529157e-13, -1.9491012807643787e-13],
            [-8.734389080056193e-13, 1.3094542540125625e-13, -4.689965321484635e-13],
            [8.38971849891762e-13, -4.082445102457366e-13, 3.598091876527709e-13]]
    g = torch.Generator().manual_seed(3)
    labels, ref_labels = torch.tensor([0]), torch.tensor([0, 1])
    for v in torch.tensor(rows):
        assert torch.linalg.vector_norm(v.double()) <= 1e-12  # below the floor in float64
        for k in (2.0, 4.0, 8.0):  # kv exactly parallel to v
            for refs in (torch.stack([v, k * v]), torch.stack([k * v, v])):
                for _ in range(10):
                    x, y = leaf(torch.randn(1, 3, generator=g)), leaf(refs)
                    loss = online_triplet_loss.batch_hard_triplet_loss(
                        labels, x, 0.0, distance="cosine", ref_embeddings=y, ref_labels=ref_labels)
                    gx, gy = torch.autograd.grad(loss, (x, y))
                    assert loss.item() == 0.0
                    assert gx.abs().max().item() == 0.0 and gy.abs().max().item() == 0.0


def huge_constant_column(device, value, rows=4096):
    """``rows`` float64 rows of 64 classes, with column 0 at ``value`` and at 0."""
    g = torch.Generator().manual_seed(12)
    emb = torch.randn(rows, 128, generator=g, dtype=torch.float64)
    huge, plain = emb.clone(), emb.clone()
    huge[:, 0], plain[:, 0] = value, 0.0
    return (torch.arange(rows, device=device) % 64, leaf(huge.to(device)),
            leaf(plain.to(device)))


def check_huge_constant_column(mining, distance, device, value, rows=4096):
    labels, x, xp = huge_constant_column(device, value, rows)
    loss = function_loss(mining, labels, x, 0.5, distance)
    want = function_loss(mining, labels, xp, 0.5, distance)
    assert want.isfinite() and want > 0
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    (g_huge,), (g_plain,) = grad_of(loss, x), grad_of(want, xp)
    torch.testing.assert_close(g_huge, g_plain, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("rows", [4096, 1500])
@pytest.mark.parametrize("value", [5e304, 1.5e308])
@pytest.mark.parametrize("distance", ["euclidean", "squared"])
@pytest.mark.parametrize("mining", LOSSES)
def test_a_huge_constant_column_changes_no_distance(mining, distance, value, rows):
    """A float64 column of 5e304 or 1.5e308 in each of 4096 rows: its sum
    overflows, but the centre's first estimate, the mean of the first block
    of rows (2048 at D = 128 on the CPU), is summed over the rows divided by
    a power of two at least their number, which does not, so the column is
    centred to 0 and the loss and gradient are those without it (before,
    the overflowed mean made them NaN). Distances do not change with a
    constant column. With 1500 rows, one block of 1500, only the power of
    two above the length (2048) keeps 1.5e308 from overflowing: the one
    below (1024) would not. (test_cuda checks a device, where the block is
    every row.)"""
    check_huge_constant_column(mining, distance, torch.device("cpu"), value, rows)


# (chunk_size, portable, class size): batch-all's native kernels over one
# chunk with few positives an anchor, over one chunk with more than 16 (the
# bucket kernel), over chunks of 1 (the half-matrix kernel), and the
# libtorch path that CUDA takes.
_ALL_PATHS = {"few": (None, False, 3), "many": (None, False, 20), "half-matrix": (1, False, 3),
              "portable": (None, True, 3), "portable-many": (None, True, 20)}


@pytest.mark.parametrize("path", _ALL_PATHS)
def test_batch_all_keeps_a_margin_below_an_ulp_of_the_distances(path):
    """Found by review: batch-all's hinges were t − d_an with t = d_ap + m
    rounded to float32, so a margin below half an ulp of d_ap vanished from
    the value while the triplet was still counted and got a gradient (loss 0,
    fraction 0.5). On integer points with squared distances (exact in
    float32) the value must be the float64 reference's to its rounding, far
    below the count times the margin that was lost."""
    from online_triplet_loss import _core

    chunk_size, portable, size = _ALL_PATHS[path]
    g = torch.Generator().manual_seed(11)
    margin = 1e-8
    for _ in range(5):
        labels = (torch.arange(6 * size) % 6)[torch.randperm(6 * size, generator=g)]
        x = torch.randint(-3, 4, (6 * size, 3), generator=g).float()
        total, count, _ = _core.triplet_terms("all", labels, x, margin, "squared", False,
                                              chunk_size=chunk_size, portable=portable)
        ref = R.reference_terms("all", labels, x.double(), margin, "squared")
        assert count.item() == ref.count > 0
        assert abs(float(total) - float(ref.sum)) <= 1e-3 * margin * ref.count


@pytest.mark.parametrize("path", ["few", "half-matrix", "portable"])
def test_batch_all_with_a_margin_that_overflows_t_in_float32(path):
    """Found by review: with d_ap + m beyond float32's largest value (a
    margin that is itself a float32), batch-all's hinges were inf, where
    their sum fits in float32 (batch-hard's did)."""
    from online_triplet_loss import _core

    chunk_size, portable, _ = _ALL_PATHS[path]
    labels = torch.tensor([0, 0, 1, 1])
    x = torch.tensor([[0.0], [1e18], [4e18], [5e18]])
    margin = 3.4e38
    total, count, _ = _core.triplet_terms("all", labels, x, margin, "squared", False,
                                          chunk_size=chunk_size, portable=portable)
    ref = R.reference_terms("all", labels, x.double(), margin, "squared")
    assert count.item() == ref.count > 0
    assert math.isfinite(float(total))
    assert float(total) == pytest.approx(float(ref.sum), rel=1e-6)


@pytest.mark.parametrize("mining", ["hard", "semihard"])
@pytest.mark.parametrize("path", _ALL_PATHS)
def test_hinges_at_the_margins_boundary_are_taken_in_float64(mining, path):
    """Found by review: the libtorch path's semi-hard hinges (CUDA's) and
    every path's batch-hard ones were d_ap − d_an + m in float32, where a
    margin rounded down drops a hinge that is positive by less than an ulp:
    on integer points with squared distances (exact in float32) and a margin
    of 1 + 1e-8, every triplet with d_an − d_ap = 1 lost its 1e-8 and, for
    the learned margin, its gradient. The native semi-hard kernels were
    right."""
    from online_triplet_loss import _core

    chunk_size, portable, size = _ALL_PATHS[path]
    g = torch.Generator().manual_seed(12)
    margin = 1.0 + 1e-8
    boundary = 0
    for _ in range(5):
        labels = (torch.arange(6 * size) % 6)[torch.randperm(6 * size, generator=g)]
        x = torch.randint(-2, 3, (6 * size, 2), generator=g).float()
        m = torch.tensor(margin, dtype=torch.float64, requires_grad=True)
        total, count, _ = _core.triplet_terms(mining, labels, x, margin, "squared", False,
                                              chunk_size=chunk_size, margin_tensor=m,
                                              portable=portable)
        ref_m = torch.tensor(margin, dtype=torch.float64, requires_grad=True)
        ref = R.reference_terms(mining, labels, x.double(), ref_m, "squared")
        assert count.item() == ref.count > 0
        assert abs(float(total) - float(ref.sum)) <= 1e-3 * 1e-8 * ref.count
        (grad,) = torch.autograd.grad(total, m)
        (ref_grad,) = torch.autograd.grad(ref.sum, ref_m)
        assert float(grad) == float(ref_grad)
        # What the margin rounded to float32 gives, which must be told apart.
        rounded = R.reference_terms(mining, labels, x.double(), 1.0, "squared")
        boundary += abs(float(rounded.sum) - float(ref.sum)) > 1e-3 * 1e-8 * ref.count
    assert boundary == 5


@pytest.mark.parametrize("mining", ["hard", "semihard"])
@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
def test_hinges_beyond_float32s_largest_value_do_not_overflow(mining, portable):
    """Found by review: a hinge d_ap − d_an + m above float32's largest value
    (a margin that is itself a float32) was inf on the libtorch path's
    semi-hard and every path's batch-hard, where the float64 sum is finite
    (and so is the loss, here their mean over two anchors or pairs)."""
    from online_triplet_loss import _core

    labels = torch.tensor([0, 2])
    x = torch.tensor([[-8.7e18], [-8.7e18]])
    y = torch.tensor([[8.7e18], [-8.7e18]])
    margin = 3e38
    total, count, _ = _core.triplet_terms(mining, labels, x, margin, "squared", False, y, labels,
                                          portable=portable)
    ref = R.reference_terms(mining, labels, x.double(), margin, "squared",
                            ref_embeddings=y.double(), ref_labels=labels)
    assert count.item() == ref.count == 2
    assert torch.finfo(torch.float32).max < float(ref.sum) < 2 * torch.finfo(torch.float32).max
    assert math.isfinite(float(total))
    assert float(total) == pytest.approx(float(ref.sum), rel=1e-6)
