"""Gradients of Euclidean batch-all and semi-hard when samples have near-copies.

A distance computed from Gram products, sqrt(|x|^2 + |y|^2 - 2 x.y), loses
its relative precision as two rows approach each other, and with it the
factor 1/d of its gradient: near-copies got gradients off by more than their
size, or none (a Gram distance that rounds to 0). The native kernels take
such pairs apart and differentiate their exact distance |x - y|, from the
embeddings themselves (not their centred copies). Checked against the float64
brute force of ``reference.py``, whose distances are differences, on every
native path: the chunked kernels, the half-matrix batch-all (small chunks),
identical rows among the near ones (tie handling), and a reference set in
parts with the anchors inside it.
"""

from __future__ import annotations

import pytest
import torch

import reference as R
from online_triplet_loss import _core

MARGIN = 0.1


def _near_batch(dtype: torch.dtype, gap: float, seed: int, negatives: bool,
                exact_copy: bool = False):
    """Six classes of three unit vectors in 32-D; eight samples get a copy
    ``gap`` away, four under their own label (near positives) and four under
    another label with ``negatives`` (near negatives); with ``exact_copy``,
    one sample also an identical row under another label.

    Semi-hard takes no near negatives: a negative within rounding of a
    positive of the same anchor (the copy of one) makes its choice of the
    nearest negative beyond the positive a matter of rounding, in the
    reference too."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda n: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(n, 32, generator=g, dtype=torch.float64), dim=1)
    x = unit(18)
    labels = torch.arange(18) // 3
    copies = x[[0, 4, 8, 12, 1, 5, 9, 13]] + gap * unit(8)
    shift = 1 if negatives else 0
    copy_labels = torch.cat([(labels[[0, 4, 8, 12]] + shift) % 6, labels[[1, 5, 9, 13]]])
    x, labels = torch.cat([x, copies]), torch.cat([labels, copy_labels])
    x = x.to(dtype)
    if exact_copy:
        x = torch.cat([x, x[2:3]])
        labels = torch.cat([labels, torch.tensor([5])])
    return labels, x


def _reference_grad(mining, labels, x, ref=None, ref_labels=None, offset=None):
    xd = x.detach().double().requires_grad_()
    want = R.reference_terms(mining, labels, xd, MARGIN, "euclidean",
                             ref_embeddings=None if ref is None else ref.detach().double(),
                             ref_labels=ref_labels, anchor_offset=offset)
    (grad,) = torch.autograd.grad(want.sum, xd)
    return want, grad


def _assert_value(got_sum, want, dtype):
    # The value comes from the Gram distances: each within a few sqrt(eps)
    # of the exact one (for unit rows), two a term.
    bound = 4 * torch.finfo(dtype).eps ** 0.5 * max(want.count, 1)
    assert float(got_sum.detach()) == pytest.approx(float(want.sum.detach()), abs=bound)


def _tolerance(want_grad):
    # Near pairs get their exact distance's gradient (up to 2^-10 of it where
    # it goes through the weight matrix); just beyond the bound where the
    # kernels stop taking pairs apart, the Gram distance's 1/d is still off
    # by about sqrt(D) / 2^15 of itself, in either dtype. Before, near-copies
    # were off by more than the gradient's own size.
    return 1e-4 * (float(want_grad.abs().max()) + 1.0)


# (chunk_size, portable): the native kernels over one chunk, over chunks of
# 4 (batch-all: its half-matrix kernel), over rows (semi-hard's too), and the
# libtorch path that CUDA takes, over one chunk and over chunks of 4.
PATHS = {"one-chunk": (None, False), "chunks-of-4": (4, False), "rows": (1, False),
         "portable": (None, True), "portable-chunks-of-4": (4, True)}

# Semi-hard in float32 only with copies 1e-3 apart (float64: down to 1e-11):
# closer ones are as far from another anchor within rounding of each other,
# and which of the two is its semi-hard negative (the same value, the
# gradient on another row) is a matter of rounding, in the reference too.
CASES = [("all", torch.float32, gap) for gap in (1e-2, 1e-3, 1e-5, 1e-7)] + \
    [("semihard", torch.float32, 1e-3)] + \
    [("all", torch.float64, gap) for gap in (1e-3, 1e-7, 1e-11, 1e-14)] + \
    [("semihard", torch.float64, gap) for gap in (1e-3, 1e-7, 1e-11)]


@pytest.mark.parametrize("mining,dtype,gap", CASES,
                         ids=[f"{m}-{d}-{g:g}".replace("torch.", "") for m, d, g in CASES])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("exact_copy", [False, True], ids=["near", "near-and-identical"])
def test_near_copies_get_the_gradient_of_their_exact_distance(mining, dtype, gap, exact_copy,
                                                               path):
    chunk_size, portable = PATHS[path]
    check_near_copies(mining, dtype, gap, torch.device("cpu"), exact_copy, chunk_size, portable)


def check_near_copies(mining, dtype, gap, device, exact_copy=False, chunk_size=None,
                      portable=False):
    """The loss of a near-copies batch on ``device`` against the reference."""
    labels, x = _near_batch(dtype, gap, 3, mining == "all", exact_copy)
    xd = x.to(device).requires_grad_()
    got_sum, got_count, _ = _core.triplet_terms(mining, labels.to(device), xd, MARGIN,
                                                "euclidean", False, chunk_size=chunk_size,
                                                portable=portable)
    (got_grad,) = torch.autograd.grad(got_sum, xd)
    want, want_grad = _reference_grad(mining, labels, x)
    assert int(got_count) == want.count
    _assert_value(got_sum.cpu(), want, dtype)
    _assert_grad(got_grad.cpu(), want_grad)


def _assert_grad(got_grad, want_grad):
    err = float((got_grad.double() - want_grad).abs().max())
    assert err <= _tolerance(want_grad), f"gradient off by {err:.3g}"


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("mining,dtype", [("all", torch.float32), ("all", torch.float64),
                                          ("semihard", torch.float64)])
def test_near_copies_against_a_reference_set_in_parts(mining, dtype, portable):
    """Anchors inside a reference set of two parts (the anchors, then a bank
    that requires grad too), with near-copies within each part and across."""
    negatives = mining == "all"
    labels, x = _near_batch(dtype, 1e-6, 4, negatives)
    bank_labels, bank = _near_batch(dtype, 1e-6, 5, negatives)
    # A bank row near-copies an anchor (under another label for batch-all).
    bank[0] = x[3] + 1e-7
    bank_labels[0] = labels[3] + 1 if negatives else labels[3]
    x, bank = x.requires_grad_(), bank.requires_grad_()
    ref, ref_labels = [x, bank], torch.cat([labels, bank_labels])
    got_sum, _, _ = _core.triplet_terms(mining, labels, x, MARGIN, "euclidean", False,
                                        ref, ref_labels, 0, chunk_size=8, portable=portable)
    got_x, got_bank = torch.autograd.grad(got_sum, (x, bank))
    # The anchors are the reference set's first rows: both gradients are x's.
    xd = x.detach().double().requires_grad_()
    bd = bank.detach().double().requires_grad_()
    want = R.reference_terms(mining, labels, xd, MARGIN, "euclidean",
                             ref_embeddings=torch.cat([xd, bd]),
                             ref_labels=ref_labels, anchor_offset=0)
    want_x, want_bank = torch.autograd.grad(want.sum, (xd, bd))
    _assert_value(got_sum, want, dtype)
    _assert_grad(got_x, want_x)
    _assert_grad(got_bank, want_bank)


@pytest.mark.parametrize("path", ["one-chunk", "chunks-of-4", "portable"])
def test_near_copies_whose_centred_rows_coincide(path):
    """Two float32 rows two ulps apart under other labels, near the origin,
    in a batch whose other rows are 1000 away: centred on the batch's mean,
    they round to one row. Their distance's gradient comes from the
    embeddings' own difference (before, it was lost: 1.0 off)."""
    g = torch.Generator().manual_seed(7)
    far = torch.randn(14, 8, generator=g, dtype=torch.float64)
    far[:, 0] += 1000.0
    x1 = (torch.randn(1, 8, generator=g, dtype=torch.float64) * 0.01).float()
    x2 = x1.clone()
    x2[0, 0] = torch.nextafter(torch.nextafter(x1[0, 0], torch.tensor(1.0)), torch.tensor(1.0))
    other = x1.double() + 0.3 * torch.randn(1, 8, generator=g, dtype=torch.float64)
    x = torch.cat([x1, x2, other.float(), far.float()])
    labels = torch.cat([torch.tensor([20, 21, 20]), torch.arange(14) // 2])
    centre = x.double().mean(0).float()
    assert torch.equal(x[0] - centre, x[1] - centre) and not torch.equal(x[0], x[1])
    x = x.requires_grad_()
    got_sum, got_count, _ = _core.triplet_terms("all", labels, x, MARGIN, "euclidean", False,
                                                chunk_size=PATHS[path][0],
                                                portable=PATHS[path][1])
    (got_grad,) = torch.autograd.grad(got_sum, x)
    want, want_grad = _reference_grad("all", labels, x)
    assert int(got_count) == want.count
    _assert_grad(got_grad, want_grad)


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("dtype,gap", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_near_copies_in_classes_of_twenty(dtype, gap, portable):
    """Classes larger than 16 (the kernels' other way through a row's
    negatives), with near positives and near negatives."""
    g = torch.Generator().manual_seed(8)
    unit = lambda n: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(n, 16, generator=g, dtype=torch.float64), dim=1)
    base = unit(40)
    labels = torch.arange(40) // 20
    copies = base[[0, 1, 25]] + gap * unit(3)
    x = torch.cat([base, copies]).to(dtype).requires_grad_()
    labels = torch.cat([labels, torch.tensor([0, 1, 1])])
    got_sum, got_count, _ = _core.triplet_terms("all", labels, x, MARGIN, "euclidean", False,
                                                portable=portable)
    (got_grad,) = torch.autograd.grad(got_sum, x)
    want, want_grad = _reference_grad("all", labels, x)
    assert int(got_count) == want.count
    _assert_grad(got_grad, want_grad)


def test_more_near_pairs_than_the_portable_budget():
    """Two tight clusters of 24 float64 rows each, every class one row in
    each: every row has 23 near negatives, 1104 near pairs against the
    libtorch path's fixed budget (2 a row, at least 1024). The first 1024
    get their exact distance's gradient; the rest keep their Gram
    distance's, which at these distances (1e-7 against norms of 1, float64)
    is still close (measured: 3e-3 off in gradients up to 42; the native
    kernels, without a budget, 3e-8). In float32 such pairs are as wrong as
    before near pairs were taken apart. The value and the count do not
    depend on the budget."""
    g = torch.Generator().manual_seed(9)
    unit = torch.nn.functional.normalize(torch.randn(1, 16, generator=g, dtype=torch.float64), dim=1)
    spread = 1e-7 * torch.randn(48, 16, generator=g, dtype=torch.float64)
    x = torch.cat([unit.expand(24, 16), -unit.expand(24, 16)]) + spread
    labels = torch.cat([torch.arange(24), torch.arange(24)])
    xd = x.clone().requires_grad_()
    got_sum, got_count, _ = _core.triplet_terms("all", labels, xd, MARGIN, "euclidean", False,
                                                portable=True)
    (got_grad,) = torch.autograd.grad(got_sum, xd)
    want, want_grad = _reference_grad("all", labels, x)
    assert int(got_count) == want.count
    _assert_value(got_sum, want, torch.float64)
    assert got_grad.isfinite().all()
    err = float((got_grad - want_grad).abs().max())
    assert err <= 1e-3 * (float(want_grad.abs().max()) + 1.0), f"gradient off by {err:.3g}"
    native_sum, _, _ = _core.triplet_terms("all", labels, xd, MARGIN, "euclidean", False)
    (native_grad,) = torch.autograd.grad(native_sum, xd)
    _assert_grad(native_grad, want_grad)
