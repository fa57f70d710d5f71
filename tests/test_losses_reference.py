"""The three losses against the brute-force reference (tests/reference.py).

Layout: smoke -> reference values and gradients (functions and modules) ->
module equals function -> reference sets -> chunking -> gradcheck -> exact ties.
"""

from __future__ import annotations

import doctest
import math
import random

import pytest
import torch

import online_triplet_loss
import reference as R
from conftest import Batch, make_batch, make_reference_set
from helpers import (
    DISTANCES,
    LOSSES,
    config_id,
    configs,
    function_loss,
    grad_of,
    leaf,
    make_module,
)
from online_triplet_loss import _core, losses

CONFIGS = configs()

# float64 throughout: the implementation and the reference differ only by
# rounding.
VALUE_TOL = dict(rtol=1e-9, atol=1e-10)
GRAD_TOL = dict(rtol=1e-7, atol=1e-9)


def assert_close(got, expected, what, **tol):
    torch.testing.assert_close(got, expected.to(got.dtype), msg=lambda m: f"{what}: {m}", **tol)


def check_against_reference(batch, mining, distance, margin, soft):
    labels, emb = batch.labels, batch.embeddings
    x_ref = leaf(emb)
    ref = R.reference_terms(mining, labels, x_ref, margin, distance, soft=soft)
    (ref_grad,) = grad_of(ref.loss, x_ref)

    # public function
    x = leaf(emb)
    if mining == "all":
        loss, fraction = online_triplet_loss.batch_all_triplet_loss(labels, x, margin, distance=distance)
        assert fraction.dtype == emb.dtype and fraction.shape == ()
        assert_close(fraction, torch.tensor(ref.fraction, dtype=torch.float64), "fraction", **VALUE_TOL)
    else:
        loss = function_loss(mining, labels, x, margin, distance, soft)
    assert loss.dtype == emb.dtype and loss.shape == ()
    assert_close(loss.detach(), ref.loss.detach(), "function loss", **VALUE_TOL)
    (g,) = grad_of(loss, x)
    assert_close(g, ref_grad, "function gradient", **GRAD_TOL)

    # module
    x = leaf(emb)
    module_loss = make_module(mining, margin, distance, soft)(x, labels)
    assert_close(module_loss.detach(), ref.loss.detach(), "module loss", **VALUE_TOL)
    (g,) = grad_of(module_loss, x)
    assert_close(g, ref_grad, "module gradient", **GRAD_TOL)

    # unnormalised terms
    s, c, v = losses.terms(mining, labels, leaf(emb), margin, distance=distance, soft=soft)
    assert c.dtype == torch.int64 and v.dtype == torch.int64
    assert (int(c), int(v)) == (ref.count, ref.valid), "count / valid"
    assert_close(s.detach(), ref.sum.detach(), "sum", **VALUE_TOL)


# --------------------------------------------------------------------------- smoke


def test_smoke_public_api():
    names = {
        "batch_all_triplet_loss", "batch_hard_triplet_loss", "batch_semihard_triplet_loss",
        "BatchAllTripletLoss", "BatchHardTripletLoss", "BatchSemiHardTripletLoss",
    }
    assert names <= set(online_triplet_loss.__all__)
    assert names <= set(losses.__all__)
    for name in names:
        assert getattr(online_triplet_loss, name) is getattr(losses, name)
    for cls in (online_triplet_loss.BatchAllTripletLoss, online_triplet_loss.BatchHardTripletLoss,
                online_triplet_loss.BatchSemiHardTripletLoss):
        assert issubclass(cls, torch.nn.Module)


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_smoke_runs_and_backpropagates(mining, dtype):
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    x = torch.randn(6, 4, dtype=dtype, requires_grad=True)
    loss = function_loss(mining, labels, x, 0.5, "euclidean")
    assert loss.shape == () and loss.dtype == dtype and loss.requires_grad
    loss.backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()


def test_smoke_docstring_examples():
    result = doctest.testmod(losses, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


def test_smoke_module_defaults_and_repr():
    for cls in (online_triplet_loss.BatchAllTripletLoss, online_triplet_loss.BatchSemiHardTripletLoss):
        m = cls()
        assert m.margin == 1.0 and m.distance == "euclidean"
        assert "margin=1.0" in repr(m) and "euclidean" in repr(m)
    m = online_triplet_loss.BatchHardTripletLoss(margin=0.0, distance="cosine", soft=True)
    assert (m.margin, m.distance, m.soft) == (0.0, "cosine", True)
    assert "soft=True" in repr(m)


def test_repr_says_how_a_margin_tensor_is_held():
    """Learned or frozen for the module's Parameter; for a tensor set on it,
    whether it requires grad as it does now (it said so of every tensor)."""
    cls = online_triplet_loss.BatchHardTripletLoss
    p = torch.nn.Parameter(torch.tensor(0.25))
    assert "margin=0.25 (learned)" in repr(cls(margin=p))
    p.requires_grad_(False)
    assert "margin=0.25 (frozen)" in repr(cls(margin=p))
    t = torch.tensor(0.5, requires_grad=True)
    m = cls(margin=t)
    assert "margin=0.5 (requires grad, not a parameter of this module)" in repr(m)
    t.requires_grad_(False)
    assert "margin=0.5 (not a parameter of this module)" in repr(m)
    m.margin = torch.tensor(0.75)
    assert "margin=0.75 (not a parameter of this module)" in repr(m)
    m = cls(margin=torch.nn.Parameter(torch.tensor(0.5)))
    torch.nn.utils.parametrize.register_parametrization(m, "margin", torch.nn.Softplus())
    assert "(parametrized)" in repr(m)
    x = torch.randn(6, 3, requires_grad=True)
    m(x, torch.tensor([0, 0, 1, 1, 2, 2])).backward()
    assert m.parametrizations.margin.original.grad is not None


# ------------------------------------------- the reference itself, by hand

# 1-D points 0, 1, 3, 6 with labels 0, 0, 1, 1. Euclidean distances:
# d01=1 d02=3 d03=6 d12=2 d13=5 d23=3.
HAND_LABELS = torch.tensor([0, 0, 1, 1])
HAND_X = torch.tensor([[0.0], [1.0], [3.0], [6.0]], dtype=torch.float64)


def _hand_cases():
    sp = lambda z: math.log1p(math.exp(z))  # noqa: E731
    return [
        # batch-all, m=1: active (2,3,0): 1, (2,3,1): 2; (1,0,2) is exactly 0 and not counted.
        ("all", "euclidean", 1.0, False, 3.0 / 2, 2, 8),
        # batch-all, m=0: (2,3,1): 3-2 = 1 only.
        ("all", "euclidean", 0.0, False, 1.0, 1, 8),
        # batch-hard, m=1: anchor 2: 3 - 2 + 1 = 2; others <= 0.
        ("hard", "euclidean", 1.0, False, 2.0 / 4, 4, 4),
        ("hard", "euclidean", 0.0, True, (sp(-2) + sp(-1) + sp(1) + sp(-2)) / 4, 4, 4),
        # squared: d01=1 d02=9 d03=36 d12=4 d13=25 d23=9; anchor 2: 9 - 4 = 5.
        ("hard", "squared", 0.0, False, 5.0 / 4, 4, 4),
        # semi-hard, m=1: (2,3): d_ap=3, negatives 3 (not > 3) and 2 -> largest is n=0 at 3:
        # relu(3-3+1) = 1; the other pairs are 0.
        ("semihard", "euclidean", 1.0, False, 1.0 / 4, 4, 4),
    ]


@pytest.mark.parametrize("case", _hand_cases(), ids=lambda c: f"{c[0]}-{c[1]}-m{c[2]}-soft{c[3]}")
def test_reference_and_implementation_match_hand_computed(case):
    mining, distance, margin, soft, expected, count, valid = case
    ref = R.reference_terms(mining, HAND_LABELS, HAND_X, margin, distance, soft=soft)
    assert (ref.count, ref.valid) == (count, valid)
    assert math.isclose(float(ref.loss), expected, rel_tol=1e-12)
    got = function_loss(mining, HAND_LABELS, HAND_X, margin, distance, soft)
    assert math.isclose(float(got), expected, rel_tol=1e-12)
    s, c, v = losses.terms(mining, HAND_LABELS, HAND_X, margin, distance=distance, soft=soft)
    assert (int(c), int(v)) == (count, valid)
    if mining == "all":
        frac = online_triplet_loss.batch_all_triplet_loss(HAND_LABELS, HAND_X, margin)[1]
        assert math.isclose(float(frac), count / valid, rel_tol=1e-12)


def test_reference_cosine_by_hand():
    # (1,0), (0,1) in class 0; (1,1) and the zero vector in class 1.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    d_close = 1 - 1 / math.sqrt(2)
    # hard, m=0: anchors 0 and 1: d_ap = 1, nearest negative (1,1) at 1-1/sqrt2;
    # anchor 2: positive is the zero vector (distance 1), negatives at d_close;
    # anchor 3 (zero vector): every distance is 1 -> 0.
    expected = ((1 - d_close) * 3 + 0.0) / 4
    ref = R.batch_hard(labels, x, 0.0, "cosine")
    assert math.isclose(float(ref.loss), expected, rel_tol=1e-12)
    got = online_triplet_loss.batch_hard_triplet_loss(labels, x, 0.0, distance="cosine")
    assert math.isclose(float(got), expected, rel_tol=1e-12)


# --------------------------------------------------- reference: values, gradients


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_reference_distinct_batches(distinct_batch, cfg):
    check_against_reference(distinct_batch, *cfg)


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_reference_batches_with_duplicate_rows(duplicate_batch, cfg):
    """Exact duplicate rows: distances of exactly 0 and exact ties, which the
    definitions resolve (strict > for semi-hard and for 'loss > 0', ties to
    the lowest index)."""
    check_against_reference(duplicate_batch, *cfg)


@pytest.mark.parametrize("squared", [False, True])
def test_reference_squared_flag_equals_distance(squared):
    b = make_batch(7, min_size=20)
    distance = "squared" if squared else "euclidean"
    for mining in LOSSES:
        a = function_loss(mining, b.labels, b.embeddings, 0.3, distance)
        fn = {"all": lambda *a, **k: online_triplet_loss.batch_all_triplet_loss(*a, **k)[0],
              "hard": online_triplet_loss.batch_hard_triplet_loss,
              "semihard": online_triplet_loss.batch_semihard_triplet_loss}[mining]
        assert torch.equal(fn(b.labels, b.embeddings, 0.3, squared), a)
        assert torch.equal(fn(b.labels, b.embeddings, 0.3, squared=squared), a)


def test_reference_float32_inputs():
    """float32 inputs against the float64 reference of the same values."""
    for seed in range(5):
        b = make_batch(300 + seed, min_size=10)
        x32 = b.embeddings.float()
        for mining, distance, margin, soft in CONFIGS:
            if margin == 0.0:
                continue
            x = leaf(x32)
            loss = function_loss(mining, b.labels, x, margin, distance, soft)
            assert loss.dtype == torch.float32
            (g,) = grad_of(loss, x)
            xr = leaf(x32.double())
            ref = R.reference_terms(mining, b.labels, xr, margin, distance, soft=soft)
            (gr,) = grad_of(ref.loss, xr)
            what = f"seed {300 + seed} {mining} {distance} m={margin} soft={soft}"
            assert_close(loss.detach().double(), ref.loss.detach(), what, rtol=1e-4, atol=1e-4)
            assert_close(g.double(), gr, what + " grad", rtol=1e-3, atol=1e-4)


# ------------------------------------------------------- module equals function


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_module_equals_function(cfg):
    mining, distance, margin, soft = cfg
    b = make_batch(11, min_size=12)
    x1, x2 = leaf(b.embeddings), leaf(b.embeddings)
    f = function_loss(mining, b.labels, x1, margin, distance, soft)
    m = make_module(mining, margin, distance, soft)(x2, b.labels)
    assert torch.equal(f, m)
    assert torch.equal(grad_of(f, x1)[0], grad_of(m, x2)[0])

    # with a reference set
    ref = make_batch(12, min_size=5, dim=b.embeddings.shape[1])
    rl, re_ = ref.labels, ref.embeddings
    f = function_loss(mining, b.labels, b.embeddings, margin, distance, soft,
                      ref_embeddings=re_, ref_labels=rl)
    m = make_module(mining, margin, distance, soft)(b.embeddings, b.labels,
                                                   ref_embeddings=re_, ref_labels=rl)
    assert torch.equal(f, m)

    # with a reference set in parts, the batch first
    parts, rl = [b.embeddings, re_], torch.cat([b.labels, rl])
    f = function_loss(mining, b.labels, b.embeddings, margin, distance, soft,
                      ref_embeddings=parts, ref_labels=rl, anchor_offset=0)
    m = make_module(mining, margin, distance, soft)(b.embeddings, b.labels,
                                                   ref_embeddings=parts, ref_labels=rl,
                                                   anchor_offset=0)
    assert torch.equal(f, m)


# --------------------------------------------------------------- reference sets


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[2] != 0.2], ids=config_id)
@pytest.mark.parametrize("seed", range(4))
def test_reference_set_public_functions(cfg, seed):
    """ref_embeddings / ref_labels keyword (no offset: no anchor is excluded)."""
    mining, distance, margin, soft = cfg
    labels, emb, rlabels, remb, _ = make_reference_set(1000 + seed, 5 + 7 * seed, 2 + seed,
                                                       with_offset=False)
    x, y = leaf(emb), leaf(remb)
    loss = function_loss(mining, labels, x, margin, distance, soft, ref_embeddings=y, ref_labels=rlabels)
    gx, gy = grad_of(loss, x, y)
    xr, yr = leaf(emb), leaf(remb)
    ref = R.reference_terms(mining, labels, xr, margin, distance, soft=soft,
                            ref_embeddings=yr, ref_labels=rlabels)
    grx, gry = grad_of(ref.loss, xr, yr)
    assert ref.valid > 0, "the reference set should hold triplets"
    assert_close(loss.detach(), ref.loss.detach(), "loss", **VALUE_TOL)
    assert_close(gx, grx, "grad embeddings", **GRAD_TOL)
    assert_close(gy, gry, "grad ref_embeddings", **GRAD_TOL)
    if mining == "all":
        frac = online_triplet_loss.batch_all_triplet_loss(labels, emb, margin, distance=distance,
                                                          ref_embeddings=remb, ref_labels=rlabels)[1]
        assert math.isclose(float(frac), ref.fraction, rel_tol=1e-12, abs_tol=1e-15)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[2] != 0.2], ids=config_id)
@pytest.mark.parametrize("seed", range(4))
def test_reference_set_with_anchor_offset(cfg, seed):
    """Anchors are references k..k+n: each anchor is excluded as its own positive."""
    mining, distance, margin, soft = cfg
    labels, emb, rlabels, remb, k = make_reference_set(2000 + seed, 1 + 6 * seed, 3, with_offset=True)
    x, y = leaf(emb), leaf(remb)
    s, c, v = losses.terms(mining, labels, x, margin, distance=distance, soft=soft,
                           ref_embeddings=y, ref_labels=rlabels, anchor_offset=k)
    xr, yr = leaf(emb), leaf(remb)
    ref = R.reference_terms(mining, labels, xr, margin, distance, soft=soft, ref_embeddings=yr,
                            ref_labels=rlabels, anchor_offset=k)
    assert (int(c), int(v)) == (ref.count, ref.valid)
    assert_close(s.detach(), ref.sum.detach(), "sum", **VALUE_TOL)
    gx, gy = grad_of(s, x, y)
    grx, gry = grad_of(ref.sum, xr, yr)
    assert_close(gx, grx, "grad embeddings", **GRAD_TOL)
    assert_close(gy, gry, "grad ref_embeddings", **GRAD_TOL)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[2] != 0.2], ids=config_id)
@pytest.mark.parametrize("seed", range(3))
def test_reference_set_in_parts(cfg, seed):
    """ref_embeddings as (batch, bank, more): the reference set their
    concatenation holds, against the brute force over it, with the anchors
    at offset 0; gradients reach each part that requires grad (the bank's
    is not computed when it requires none)."""
    mining, distance, margin, soft = cfg
    labels, emb, blabels, bank, _ = make_reference_set(3000 + seed, 4 + 5 * seed, 3,
                                                       with_offset=False)
    more = bank[: 2 + seed].flip(1)
    mlabels = blabels[: 2 + seed]
    rlabels = torch.cat([labels, blabels, mlabels])
    for bank_grad in (False, True):
        x, b, m = leaf(emb), bank.clone().requires_grad_(bank_grad), leaf(more)
        loss = function_loss(mining, labels, x, margin, distance, soft,
                             ref_embeddings=(x, b, m), ref_labels=rlabels, anchor_offset=0)
        xr, br, mr = leaf(emb), bank.clone().requires_grad_(bank_grad), leaf(more)
        ref = R.reference_terms(mining, labels, xr, margin, distance, soft=soft,
                                ref_embeddings=torch.cat([xr, br, mr]), ref_labels=rlabels,
                                anchor_offset=0)
        assert ref.valid > 0, "the reference set should hold triplets"
        assert_close(loss.detach(), ref.loss.detach(), "loss", **VALUE_TOL)
        wrt, wrt_ref, names = ((x, b, m), (xr, br, mr), ("embeddings", "bank", "more"))
        if not bank_grad:
            wrt, wrt_ref, names = (x, m), (xr, mr), ("embeddings", "more")
        for got, want, name in zip(grad_of(loss, *wrt), grad_of(ref.loss, *wrt_ref), names,
                                   strict=True):
            assert_close(got, want, f"grad {name}", **GRAD_TOL)


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", LOSSES)
def test_reference_parts_are_their_concatenation_in_chunks(mining, distance, portable):
    """Parts (the batch, then a memory) against the one concatenated tensor,
    in the core: the same terms and gradients, for each part that requires
    grad, over several chunks of anchors, on both kernels."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    extra = torch.randn(50, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (30,), generator=g)
    ref_labels = torch.cat([labels, torch.randint(0, 5, (50,), generator=g)])
    for extra_grad in (False, True):
        results = []
        for joined in (True, False):
            a = x.clone().requires_grad_(True)
            e = extra.clone().requires_grad_(extra_grad)
            refs = torch.cat([a, e]) if joined else [a, e]
            sum_, count, valid = _core.triplet_terms(
                mining, labels, a, 0.4, distance, False, refs, ref_labels, 0, 7,
                portable=portable)
            grads = torch.autograd.grad(sum_, [a, e] if extra_grad else [a])
            results.append((sum_, count, valid, grads))
        (s0, c0, v0, g0), (s1, c1, v1, g1) = results
        assert s0.item() > 0 and c0.item() > 0
        torch.testing.assert_close(s1, s0, rtol=1e-12, atol=1e-12)
        assert torch.equal(c1, c0) and torch.equal(v1, v0)
        for got, want in zip(g1, g0, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("ref_grad", [True, False], ids=["ref-grad", "memory-bank"])
@pytest.mark.parametrize("split", [None, (1000, 2100, 1900)], ids=["one", "parts"])
def test_reference_set_of_several_blocks_of_rows(mining, distance, ref_grad, split):
    """A reference set of 5000 x 128 rows far from the origin, which the
    passes over every reference on the CPU (the centre, the centred or
    normalised points, their norms, the tie rows) take 2048 rows at a time
    (distance.rs's ROW_BLOCK_ELEMENTS), anchors among them, as one tensor or
    in parts whose blocks end inside a part and at its end: values and
    gradients equal the brute-force reference, also for references that do
    not require grad (a memory bank's, whose gradient is not computed)."""
    g = torch.Generator().manual_seed(31)
    m, n, k = 5000, 12, 2040  # the anchors straddle the first two blocks
    rlabels = torch.randint(0, 500, (m,), generator=g)
    remb = torch.randn(m, 128, generator=g, dtype=torch.float64) + 50.0
    labels, emb = rlabels[k:k + n], remb[k:k + n]
    x, y = leaf(emb), remb.clone().requires_grad_(ref_grad)
    refs = y if split is None else y.split(split)
    s, c, v = losses.terms(mining, labels, x, 0.5, distance=distance, ref_embeddings=refs,
                           ref_labels=rlabels, anchor_offset=k)
    xr, yr = leaf(emb), leaf(remb)
    ref = R.reference_terms(mining, labels, xr, 0.5, distance, ref_embeddings=yr,
                            ref_labels=rlabels, anchor_offset=k)
    assert ref.count > 0
    assert (int(c), int(v)) == (ref.count, ref.valid)
    assert_close(s.detach(), ref.sum.detach(), "sum", **VALUE_TOL)
    grx, gry = grad_of(ref.sum, xr, yr)
    if ref_grad:
        gx, gy = grad_of(s, x, y)
        assert_close(gy, gry, "grad ref_embeddings", **GRAD_TOL)
    else:
        (gx,) = grad_of(s, x)
    assert_close(gx, grx, "grad embeddings", **GRAD_TOL)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[2] == 0.2], ids=config_id)
def test_reference_set_of_the_batch_itself_equals_plain_call(cfg):
    mining, distance, margin, soft = cfg
    b = make_batch(42, min_size=15)
    x = leaf(b.embeddings)
    plain = losses.terms(mining, b.labels, x, margin, distance=distance, soft=soft)
    (g_plain,) = grad_of(plain[0], x)
    x2 = leaf(b.embeddings)
    same = losses.terms(mining, b.labels, x2, margin, distance=distance, soft=soft,
                        ref_embeddings=x2, ref_labels=b.labels, anchor_offset=0)
    (g_same,) = grad_of(same[0], x2)
    assert [int(plain[1]), int(plain[2])] == [int(same[1]), int(same[2])]
    assert_close(same[0].detach(), plain[0].detach(), "sum", **VALUE_TOL)
    assert_close(g_same, g_plain, "grad", **GRAD_TOL)


# ------------------------------------------------------ batches the threads split


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if not c[3]], ids=config_id)
def test_reference_at_a_batch_the_threads_split(cfg):
    """A P x K batch large enough that the native kernels and semi-hard's
    gradient split their rows (and references) among threads: values and
    gradients still equal the brute-force reference."""
    mining, distance, margin, soft = cfg
    g = torch.Generator().manual_seed(7)
    # 512 x 512 distances, well above the threads' 1 << 16 (mining/parallel.rs)
    labels = torch.arange(64).repeat_interleave(8)[torch.randperm(512, generator=g)]
    emb = torch.randn(512, 24, generator=g, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        check_against_reference(Batch(7, labels, emb, False), mining, distance, margin, soft)
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------- chunking


CHUNK_CASES = [(m, d, r) for m in LOSSES for d in DISTANCES for r in ("none", "refs", "offset")]


@pytest.mark.parametrize("case", CHUNK_CASES, ids=lambda c: "-".join(c))
def test_chunked_equals_unchunked(case):
    """chunk_size in {1, 3, 7, B} (uneven last chunks) gives the same
    (sum, count, valid) and the same gradients as the automatic chunking."""
    mining, distance, refs = case
    for seed in (0, 1):
        b = make_batch(3000 + seed, min_size=17, max_size=37, duplicates=False)
        labels, emb = b.labels, b.embeddings
        rlabels = remb = offset = None
        if refs != "none":
            labels, emb, rlabels, remb, offset = make_reference_set(
                3100 + seed, 23, 4, with_offset=(refs == "offset"))
        n = emb.shape[0]
        margin, soft = 0.3, mining == "hard" and seed == 1

        def run(chunk):
            x = leaf(emb)
            y = leaf(remb) if remb is not None else None
            s, c, v = _core.triplet_terms(mining, labels, x, margin, distance, soft, y, rlabels,
                                          offset, chunk)
            grads = grad_of(s, x, *([y] if y is not None else []))
            return s.detach(), int(c), int(v), grads

        base = run(None)
        for chunk in (1, 3, 7, n):
            got = run(chunk)
            what = f"seed {seed} chunk_size={chunk} B={n}"
            assert got[1:3] == base[1:3], what
            assert_close(got[0], base[0], what + " sum", rtol=1e-12, atol=1e-12)
            for g, g0 in zip(got[3], base[3]):
                assert_close(g, g0, what + " grad", rtol=1e-10, atol=1e-12)


def test_chunk_size_must_be_positive():
    b = make_batch(1, min_size=5)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="chunk_size"):
            _core.triplet_terms("all", b.labels, b.embeddings, 0.1, "euclidean", False,
                                None, None, None, bad)


# --------------------------------------------------------------------- gradcheck


def separated_data(seed, n_classes=3, per_class=3, dim=3, scale=4.0):
    """Class centres far apart plus noise: generic positions, no zero
    distances, hinges away from their kinks."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g, dtype=torch.float64) * scale
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    x = centres[labels] + torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
    return labels, x


def active_margin(x, y, distance):
    """The mean distance: some hinges active, likely not all."""
    return float(R.distance_matrix(x, y, distance).mean())


GRADCHECK_CASES = [(m, d, s) for m in LOSSES for d in DISTANCES
                   for s in ((False, True) if m == "hard" else (False,))]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: f"{c[0]}-{c[1]}" + ("-soft" if c[2] else ""))
def test_gradcheck(case):
    mining, distance, soft = case
    labels, x = separated_data(5)
    margin = active_margin(x, x, distance)
    fn = lambda e: function_loss(mining, labels, e, margin, distance, soft)  # noqa: E731
    assert float(fn(x)) > 0
    assert torch.autograd.gradcheck(fn, (leaf(x),), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: f"{c[0]}-{c[1]}" + ("-soft" if c[2] else ""))
def test_gradcheck_reference_set(case):
    mining, distance, soft = case
    labels, x = separated_data(6, per_class=2)
    rlabels, y = separated_data(7, n_classes=4, per_class=2)
    margin = active_margin(x, y, distance)

    def fn(e, r):
        return function_loss(mining, labels, e, margin, distance, soft,
                             ref_embeddings=r, ref_labels=rlabels)

    assert float(fn(x, y)) > 0
    assert torch.autograd.gradcheck(fn, (leaf(x), leaf(y)), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: f"{c[0]}-{c[1]}" + ("-soft" if c[2] else ""))
def test_gradcheck_reference_set_in_parts(case):
    """The batch and two more parts, each differentiated (a constant part in
    the middle gets none)."""
    mining, distance, soft = case
    labels, x = separated_data(6, per_class=2)
    rlabels, y = separated_data(7, n_classes=4, per_class=2)
    middle_labels, middle = separated_data(8, n_classes=3, per_class=1)
    all_labels = torch.cat([labels, middle_labels, rlabels])
    margin = active_margin(x, y, distance)

    def fn(e, r):
        return function_loss(mining, labels, e, margin, distance, soft,
                             ref_embeddings=(e, middle, r), ref_labels=all_labels,
                             anchor_offset=0)

    assert float(fn(x, y)) > 0
    assert torch.autograd.gradcheck(fn, (leaf(x), leaf(y)), eps=1e-6, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------- exact ties


def _tie_batch(seed, dtype):
    """Anchor 0 and positive 1 (class 0); sample B-1 is an exact copy of the
    positive in class 1, so d(0, B-1) == d(0, 1) exactly; the other samples
    are singletons of other classes."""
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    n = rnd.randint(4, 20)
    emb = torch.randn(n, rnd.randint(1, 8), generator=g, dtype=torch.float64).to(dtype)
    labels = torch.arange(n) + 2
    labels[0] = labels[1] = 0
    labels[n - 1] = 1
    emb[n - 1] = emb[1]
    return labels, emb


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_semihard_negative_at_exactly_the_positive_distance_is_not_semihard(dtype):
    """d_an == d_ap is not semi-hard (strict >); the loss must not depend on
    rounding of the two equal distances."""
    bad = []
    for seed in range(60):
        labels, emb = _tie_batch(seed, dtype)
        got = float(online_triplet_loss.batch_semihard_triplet_loss(labels, emb, 0.5))
        exp = float(R.batch_semihard(labels, emb, 0.5).loss)
        if not math.isclose(got, exp, rel_tol=1e-5, abs_tol=1e-6):
            bad.append((seed, tuple(emb.shape), got, exp))
    assert not bad, f"(seed, shape, got, expected): {bad}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batch_all_tie_at_zero_margin_is_not_a_positive_triplet(dtype):
    """With m = 0 a triplet with d_ap == d_an exactly has loss 0: it is not
    counted among the positive triplets (the loss' denominator)."""
    bad = []
    for seed in range(60):
        labels, emb = _tie_batch(seed, dtype)
        loss, frac = online_triplet_loss.batch_all_triplet_loss(labels, emb, 0.0)
        ref = R.batch_all(labels, emb, 0.0)
        if not (math.isclose(float(frac), ref.fraction, rel_tol=1e-6, abs_tol=1e-9)
                and math.isclose(float(loss), float(ref.loss), rel_tol=1e-5, abs_tol=1e-6)):
            bad.append((seed, tuple(emb.shape), float(loss), float(frac), float(ref.loss), ref.fraction))
    assert not bad, f"(seed, shape, loss, fraction, expected loss, expected fraction): {bad}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batch_hard_ties_go_to_the_lowest_index(dtype):
    """Two exact copies of the nearest negative (in two classes): the
    gradient goes to the lower index."""
    bad = []
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        rnd = random.Random(seed)
        n = rnd.randint(5, 24)
        emb = torch.randn(n, rnd.randint(1, 8), generator=g, dtype=torch.float64)
        labels = torch.arange(n) + 10
        labels[0] = labels[1] = 0
        i, j = sorted(rnd.sample(range(2, n), 2))
        emb[i] = emb[0] + 1e-3 * emb[i]  # nearest negative of anchor 0 ...
        emb[j] = emb[i]  # ... twice
        emb = emb.to(dtype)
        x = leaf(emb)
        (gx,) = grad_of(online_triplet_loss.batch_hard_triplet_loss(labels, x, 10.0), x)
        xr = leaf(emb.double())
        (gr,) = grad_of(R.batch_hard(labels, xr, 10.0).loss, xr)
        tol = 1e-7 if dtype == torch.float64 else 1e-3
        if not torch.allclose(gx.double(), gr, rtol=tol, atol=tol):
            bad.append((seed, n, i, j, float(gx[i].norm()), float(gx[j].norm())))
    assert not bad, ("(seed, B, i, j, |grad i|, |grad j|), expected all of the gradient on i: "
                     f"{bad}")


@pytest.mark.parametrize("gap", [-800.0, -30.0, 0.0, 19.0, 21.0, 25.0, 37.0, 41.0, 60.0, 800.0])
def test_soft_margin_is_log1p_exp_at_every_size(gap):
    """log(1 + e^z) and its slope sigmoid(z) in float64 at every z: libtorch's
    softplus returns z itself above 20, 2e-9 (a million ulps) below the value,
    with a slope of exactly 1 (found by review). One anchor pair at gap z; the
    reference is logaddexp(z, 0), exact and stable."""
    labels = torch.tensor([0, 0, 1])
    # Anchor 0's positive is gap away and its negative at 0 (gap ≥ 0), or its
    # positive at 0 and its negative −gap away; anchor 2 has no positive.
    x = torch.tensor([[0.0], [gap], [0.0]], dtype=torch.float64) if gap >= 0 else \
        torch.tensor([[0.0], [0.0], [-gap]], dtype=torch.float64)
    got_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = losses.batch_hard_triplet_loss(labels, got_x, 0.0, soft=True)
    ref = R.reference_terms("hard", labels, ref_x, 0.0, "euclidean", soft=True).loss
    assert got.item() == pytest.approx(ref.item(), rel=4e-16, abs=0)
    got.backward()
    ref.backward()
    torch.testing.assert_close(got_x.grad, ref_x.grad, rtol=4e-16, atol=1e-300)
