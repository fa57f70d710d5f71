"""The portable mining path (libtorch operations, the one CUDA takes) on the CPU.

On CPU tensors the losses mine with native Rust kernels; ``portable=True``
of the private binding runs the operations that CUDA runs instead, so that
their results are checked on every machine, not only where a GPU is.

Layout: against the float64 references (values, counts, gradients; with
identical rows, reference sets and chunks) -> against the native kernels in
float32, and in float64 on rows of signs -> non-finite inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.functional import normalize as nn_normalize

import reference as R
from conftest import make_batch, make_reference_set
from helpers import DISTANCES, LOSSES, grad_of, leaf
from online_triplet_loss import _core


def terms(mining, labels, x, margin, distance, soft=False, y=None, ref_labels=None, offset=None,
          chunk=None, portable=True):
    return _core.triplet_terms(mining, labels, x, margin, distance, soft, y, ref_labels, offset,
                               chunk, portable=portable)


def native_and_portable(mining, labels, emb, distance):
    """(sum, count, valid, gradient) of each path, margin 0.2."""
    results = []
    for portable in (False, True):
        x = leaf(emb)
        s, c, v = terms(mining, labels, x, 0.2, distance, portable=portable)
        results.append((s.detach(), int(c), int(v), grad_of(s, x)[0]))
    return results


@pytest.mark.parametrize("refs", ["none", "refs", "offset"])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", LOSSES)
def test_portable_terms_match_reference(mining, distance, refs):
    margin, soft = 0.3, mining == "hard"
    cases = []
    for seed in (3200, 3201, 3202):
        if refs == "none":
            b = make_batch(seed, min_size=12, duplicates=seed != 3200)
            cases.append((b.labels, b.embeddings, None, None, None))
        else:
            cases.append(make_reference_set(seed, 19, 4, with_offset=(refs == "offset")))
    for case, (labels, emb, rlabels, remb, offset) in enumerate(cases):
        xr = leaf(emb)
        yr = leaf(remb) if remb is not None else None
        ref = R.reference_terms(mining, labels, xr, margin, distance, soft=soft, ref_embeddings=yr,
                                ref_labels=rlabels, anchor_offset=offset)
        ref_grads = grad_of(ref.sum, xr, *([yr] if yr is not None else []))
        for chunk in (None, 1, 5):
            x = leaf(emb)
            y = leaf(remb) if remb is not None else None
            s, c, v = terms(mining, labels, x, margin, distance, soft, y, rlabels, offset, chunk)
            what = f"case {case} {mining} {distance} {refs} chunk_size={chunk}"
            assert (int(c), int(v)) == (ref.count, ref.valid), what
            torch.testing.assert_close(s.detach(), torch.as_tensor(ref.sum).detach().double(),
                                       rtol=1e-9, atol=1e-10, msg=lambda m: f"{what}: {m}")
            for g, gr in zip(grad_of(s, x, *([y] if y is not None else [])), ref_grads):
                torch.testing.assert_close(g, gr, rtol=1e-7, atol=1e-9, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", LOSSES)
def test_portable_and_native_agree_in_float32(mining, distance):
    """A P x K batch with copied rows: both paths pick the same triplets, so
    the terms and gradients agree to float32 rounding."""
    g = torch.Generator().manual_seed(41)
    labels = torch.arange(24).repeat_interleave(6)
    emb = torch.randn(len(labels), 16, generator=g)
    emb[7] = emb[3]  # a copy in the same class
    emb[50] = emb[3]  # and in another
    (s0, c0, v0, g0), (s1, c1, v1, g1) = native_and_portable(mining, labels, emb, distance)
    assert (c1, v1) == (c0, v0) and c0 > 0
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", LOSSES)
def test_portable_and_native_agree_on_rows_of_signs(mining, distance):
    """float64 rows of ±0.1: many identical rows, and distinct rows that
    differ only in the signs of a few entries, which the first-copy keys
    must tell apart (a key that did not missed copies on most batches)."""
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        emb = (torch.randint(0, 2, (40, 4), generator=g) * 2 - 1).double() * 0.1
        labels = torch.randint(0, 4, (40,), generator=g)
        (s0, c0, v0, g0), (s1, c1, v1, g1) = native_and_portable(mining, labels, emb, distance)
        what = f"seed {seed} {mining} {distance}"
        assert (c1, v1) == (c0, v0), what
        torch.testing.assert_close(s1, s0, rtol=1e-9, atol=1e-10, msg=lambda m: f"{what}: {m}")
        torch.testing.assert_close(g1, g0, rtol=1e-7, atol=1e-9, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", LOSSES)
def test_portable_non_finite_input_gives_nan(mining, distance, bad):
    b = make_batch(3300, min_size=10)
    emb = b.embeddings.clone()
    emb[-1, 0] = bad  # a sample whatever the triplets
    x = leaf(emb)
    s, _, _ = terms(mining, b.labels, x, 0.2, distance)
    (g,) = grad_of(s, x)
    assert math.isnan(float(s.detach())), (mining, distance, bad)
    assert torch.isnan(g).all(), (mining, distance, bad)


# ------------------------------------------- operations with a deterministic CUDA kernel

# What torch.use_deterministic_algorithms(True) makes raise on CUDA (its
# documentation's list), for the operations a loss could use: a floating
# cumsum, histc, bincount with weights, median with indices, put_, a
# product scatter_reduce.
_NONDETERMINISTIC_ON_CUDA = {"histc", "bincount", "put", "put_", "median"}


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.refused = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        out = func(*args, **kwargs)
        first = out[0] if isinstance(out, (tuple, list)) else out
        if name in ("cumsum", "cumsum_") and isinstance(first, torch.Tensor) and (
                first.is_floating_point() or first.is_complex()):
            self.refused.append(f"{name} in {first.dtype}")
        elif name in _NONDETERMINISTIC_ON_CUDA:
            self.refused.append(name)
        elif name.startswith("scatter_reduce") and "prod" in map(str, list(args) + list(kwargs.values())):
            self.refused.append(name)
        return out


@pytest.mark.parametrize("refs", [False, True], ids=["batch", "ref-set"])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", LOSSES)
def test_portable_path_uses_only_deterministic_cuda_kernels(mining, distance, refs):
    """Every libtorch operation of the portable path, forward and backward,
    seen through a dispatch mode on the CPU: none is one that
    ``torch.use_deterministic_algorithms(True)`` refuses on CUDA, where this
    path runs (the CUDA test checks the mode itself on a GPU)."""
    labels, emb, ref_labels, ref_emb, offset = make_reference_set(32, 30, 5, with_offset=True)
    x = leaf(emb.float())
    y = leaf(ref_emb.float()) if refs else None
    kw = dict(y=y, ref_labels=ref_labels, offset=offset) if refs else {}
    mode = _RecordOps()
    with mode:
        s, _, _ = terms(mining, labels, x, 0.2, distance, chunk=8, **kw)
        s.backward()
    assert mode.refused == [], mode.refused


def test_the_operation_check_sees_the_core_operations():
    # The mode sees what the Rust core runs: a floating cumsum done there.
    mode = _RecordOps()
    with mode:
        torch.ones(3).cumsum(0)
    assert mode.refused == ["cumsum in torch.float32"]


@pytest.mark.parametrize("distance", DISTANCES)
def test_metrics_use_only_deterministic_cuda_kernels(distance):
    from online_triplet_loss.metrics import mean_average_precision_at_r, recall_at_k

    labels, emb, _, _, _ = make_reference_set(33, 40, 5, with_offset=False)
    mode = _RecordOps()
    with mode:
        recall_at_k(emb.float(), labels, ks=(1, 3), distance=distance, chunk_size=8)
        mean_average_precision_at_r(emb.float(), labels, distance=distance, chunk_size=8)
    assert mode.refused == [], mode.refused


# ------------------------------------------- batch-all's two large sums

def _circle():
    """One anchor at the origin and the 44 integer points with a² + b² = 5¹⁰:
    every squared distance is exactly 9765625 in float32, and every one of
    the 484 triplets has hinge exactly m."""
    r2 = 5 ** 10
    r = math.isqrt(r2)
    points = []
    for a in range(-r, r + 1):
        b = math.isqrt(r2 - a * a)
        if b * b == r2 - a * a:
            points += [(a, b)] + ([(a, -b)] if b else [])
    y = torch.tensor(points, dtype=torch.float32)
    return torch.tensor([0]), torch.zeros(1, 2), torch.tensor([i % 2 for i in range(len(y))]), y


def test_batch_all_sum_of_large_equal_distances_is_exact():
    # Batch-all's value is the difference of two sums of about count·d each:
    # in float32 it came out 0 instead of 484 here.
    labels, x, ref_labels, y = _circle()
    for portable in (False, True):
        s, c, v = terms("all", labels, x, 1.0, "squared", y=y, ref_labels=ref_labels,
                        portable=portable)
        assert (float(s), int(c), int(v)) == (484.0, 484, 484), portable


def test_batch_all_sum_does_not_overflow_where_its_terms_do_not():
    # Squared distances about 1e34: count·d passes float32's maximum, the
    # loss (about 1e36) does not; float32 sums gave inf − inf = NaN.
    g = torch.Generator().manual_seed(0)
    y = nn_normalize(torch.randn(100, 4, generator=g, dtype=torch.float64))
    y = (y * (1 + 1e-3 * torch.rand(100, 1, generator=g, dtype=torch.float64)) * 1e17).float()
    x = torch.randn(40, 4, generator=g) * 1e14
    labels = torch.randint(0, 2, (40,), generator=g)
    ref_labels = torch.randint(0, 2, (100,), generator=g)
    want = R.reference_terms("all", labels, x.double(), 0.0, "squared",
                             ref_embeddings=y.double(), ref_labels=ref_labels)
    for portable in (False, True):
        s, c, _ = terms("all", labels, x, 0.0, "squared", y=y, ref_labels=ref_labels,
                        portable=portable)
        assert math.isfinite(float(s)), portable
        assert float(s) == pytest.approx(float(want.sum), rel=1e-4), portable
