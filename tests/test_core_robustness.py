"""The Rust core under hostile input: grad mode after errors, dtypes, layouts and
devices it cannot use, label dtypes that mix, NaN reaching the gradients,
overflow and cancellation in float32, and the binding's own arguments.

Every expected value comes from the float64 brute-force references in
``reference.py`` or from the definitions (a NaN loss, a ValueError naming the
argument)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from online_triplet_loss import _core, batch_all_triplet_loss, metrics
from helpers import DISTANCES, LOSSES, assert_overflow_is_nan_else_right, function_loss, leaf
from reference import reference_terms

LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])


def _embeddings(seed: int, n: int = 8, d: int = 5, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)


def _ref_loss(mining, labels, x, margin, distance, **kw) -> float:
    return reference_terms(mining, labels, x.double(), margin, distance, **kw).loss.item()


# --------------------------------------------------------------------------- grad mode


def _allocation_failure(mining):
    # One chunk of 200000 x 200000 distances (160 GB) cannot be allocated:
    # the failure happens inside the no-grad mining, after validation.
    n = 200_000
    x = torch.zeros(n, 1)
    y = torch.arange(n) % 2
    return lambda: _core.triplet_terms(mining, y, x, 0.2, "euclidean", False, chunk_size=n)


def _metrics_allocation_failure():
    n = 200_000
    x = torch.randn(n, 1)
    y = torch.arange(n) % 2
    return lambda: _core.retrieval_scores(x, y, [1], full=None, distance="euclidean", chunk_size=n)


FAILURES = {
    **{f"allocation-{m}": _allocation_failure(m) for m in LOSSES},
    "allocation-metrics": _metrics_allocation_failure(),
    "uint16-labels": lambda: _core.triplet_terms(
        "hard", LABELS.to(torch.uint16), _embeddings(0), 0.2, "cosine", False),
    "float8-embeddings": lambda: _core.triplet_terms(
        "all", LABELS, _embeddings(0).to(torch.float8_e4m3fn), 0.2, "euclidean", False),
    "sparse-embeddings": lambda: _core.triplet_terms(
        "semihard", LABELS, _embeddings(0).to_sparse(), 0.2, "euclidean", False),
}


@pytest.mark.parametrize("grad_enabled", [True, False])
@pytest.mark.parametrize("name", sorted(FAILURES))
def test_grad_mode_survives_every_failure(name, grad_enabled):
    call = FAILURES[name]
    with torch.set_grad_enabled(grad_enabled):
        with pytest.raises((ValueError, RuntimeError)):
            call()
        assert torch.is_grad_enabled() is grad_enabled
    assert torch.is_grad_enabled()


def test_allocation_failure_is_a_runtime_error_without_a_panic(capfd):
    with pytest.raises(RuntimeError, match="alloc") as info:
        _allocation_failure("all")()
    assert "unwrap" not in str(info.value)
    assert "panicked" not in capfd.readouterr().err


# --------------------------------------------------------------------------- dtypes, layouts, devices

UNSIGNED = [torch.uint16, torch.uint32, torch.uint64]


@pytest.mark.parametrize("mining", LOSSES)
def test_nested_labels_beside_1d_embeddings_name_the_labels(mining, capfd):
    # The swapped-arguments hint read a nested tensor's shape, which libtorch
    # refuses: a panic, turned into a RuntimeError quoting libtorch.
    nested = torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])
    with pytest.raises(ValueError, match=r"^(labels|embeddings): "):
        _core.triplet_terms(mining, nested, torch.zeros(5), 0.2, "euclidean", False)
    assert "panicked" not in capfd.readouterr().err


def test_the_binding_refuses_an_anchor_offset_without_references():
    with pytest.raises(ValueError, match="^anchor_offset: "):
        _core.triplet_terms("all", LABELS, _embeddings(0), 0.2, "euclidean", False,
                            anchor_offset=-5)


@pytest.mark.parametrize("dtype", UNSIGNED)
@pytest.mark.parametrize("argument", ["count", "valid", "like"])
def test_terms_of_unreadable_dtypes_name_the_argument(argument, dtype):
    parts = {"sum": torch.tensor(1.0, dtype=torch.float64), "count": torch.tensor(2),
             "valid": torch.tensor(3), "like": torch.zeros(2)}
    parts[argument] = parts[argument].to(dtype)
    with pytest.raises(ValueError, match=f"^{argument}: "):
        _core.mean_and_fraction(parts["sum"], parts["count"], parts["valid"], parts["like"])


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("dtype", UNSIGNED)
def test_unsigned_wide_labels_are_value_errors(mining, dtype, capfd):
    x = _embeddings(1)
    with pytest.raises(ValueError, match=r"^labels: "):
        function_loss(mining, LABELS.to(dtype), x, 0.2, "euclidean")
    with pytest.raises(ValueError, match=r"^ref_labels: "):
        function_loss(mining, LABELS, x, 0.2, "euclidean", ref_embeddings=x,
                      ref_labels=LABELS.to(dtype))
    with pytest.raises(ValueError, match=r"^labels: "):
        metrics.recall_at_k(x, LABELS.to(dtype), ks=(1,))
    assert "panicked" not in capfd.readouterr().err


BAD_EMBEDDINGS = {
    **{str(k): (lambda k=k: _embeddings(2).to(k)) for k in (
        torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
        torch.complex64, torch.int64, torch.int32, torch.bool)},
    "sparse_coo": lambda: _embeddings(2).to_sparse(),
    "sparse_csr": lambda: _embeddings(2).to_sparse_csr(),
    "sparse_csc": lambda: _embeddings(2).to_sparse_csc(),
    "meta": lambda: torch.empty(8, 5, device="meta"),
}


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("name", sorted(BAD_EMBEDDINGS))
def test_unusable_embeddings_are_value_errors(mining, name, capfd):
    bad = BAD_EMBEDDINGS[name]()
    good = _embeddings(2)
    with pytest.raises(ValueError, match=r"^embeddings: ") as err:
        function_loss(mining, LABELS, bad, 0.2, "euclidean")
    if name.startswith("torch."):
        # torch's name of the dtype, not the Rust binding's (Int64).
        assert str(err.value).endswith(f"got dtype {name[len('torch.'):]}"), str(err.value)
    with pytest.raises(ValueError, match=r"^ref_embeddings: "):
        function_loss(mining, LABELS, good, 0.2, "euclidean", ref_embeddings=bad,
                      ref_labels=LABELS)
    err = capfd.readouterr().err
    assert "panicked" not in err and "frame #" not in err


@pytest.mark.parametrize("name", sorted(BAD_EMBEDDINGS))
def test_unusable_embeddings_in_metrics(name):
    with pytest.raises(ValueError, match=r"^embeddings: "):
        metrics.recall_at_k(BAD_EMBEDDINGS[name](), LABELS, ks=(1,))


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("distance", DISTANCES)
def test_zero_width_embeddings(mining, distance):
    # D = 0: every embedding is the zero vector; the losses and metrics follow
    # the definitions (cosine of a zero vector is 0) instead of failing.
    x = torch.zeros(8, 0, requires_grad=True)
    loss = function_loss(mining, LABELS, x, 0.2, distance)
    assert loss.item() == pytest.approx(_ref_loss(mining, LABELS, x, 0.2, distance))
    loss.backward()
    assert x.grad.shape == (8, 0)
    assert 0.0 <= metrics.recall_at_k(x.detach(), LABELS, ks=(1,), distance=distance)[1] <= 1.0


# --------------------------------------------------------------------------- label dtypes


LABEL_VARIANTS = {
    "int64": lambda l: l,
    "int32": lambda l: l.to(torch.int32),
    "uint8": lambda l: l.to(torch.uint8),
    "float64": lambda l: l.to(torch.float64),
    "float32": lambda l: l.to(torch.float32),
    "float16": lambda l: l.to(torch.float16),
    "bfloat16": lambda l: l.to(torch.bfloat16),
    "negative-zero": lambda l: torch.where(l == 0, torch.tensor(-0.0), l.double()),
}


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("anchors", sorted(LABEL_VARIANTS))
@pytest.mark.parametrize("refs", sorted(LABEL_VARIANTS))
def test_label_dtypes_that_mix_compare_by_value(mining, anchors, refs):
    x, bank = _embeddings(3), _embeddings(4)
    ref = torch.cat([x, bank])
    ref_labels = torch.cat([LABELS, LABELS.flip(0)])
    want = _ref_loss(mining, LABELS, x, 0.2, "euclidean", ref_embeddings=ref,
                     ref_labels=ref_labels)
    got = function_loss(mining, LABEL_VARIANTS[anchors](LABELS), x, 0.2, "euclidean",
                        ref_embeddings=ref, ref_labels=LABEL_VARIANTS[refs](ref_labels))
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


NAN = float("nan")


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("labels", [
    [NAN] * 8,
    [NAN, NAN, 0.0, 0.0, 1.0, 1.0, NAN, 2.0],
    [0.0, 0.0, NAN, 1.0, 1.0, NAN, 2.0, 2.0],
])
def test_nan_labels_are_all_distinct(mining, labels):
    labels = torch.tensor(labels, dtype=torch.float64)
    x = _embeddings(5)
    got = function_loss(mining, labels, x, 0.2, "euclidean")
    assert got.item() == pytest.approx(_ref_loss(mining, labels, x, 0.2, "euclidean"),
                                       rel=1e-5, abs=1e-6)
    # Also against a reference set, with and without the anchors inside it.
    bank = _embeddings(6)
    ref, ref_labels = torch.cat([x, bank]), torch.cat([labels, labels.flip(0)])
    got = _core.triplet_terms(mining, labels, x, 0.2, "euclidean", False, ref, ref_labels, 0)
    want = reference_terms(mining, labels, x.double(), 0.2, "euclidean", ref_embeddings=ref.double(),
                           ref_labels=ref_labels, anchor_offset=0)
    assert float(got[0]) == pytest.approx(float(want.sum), rel=1e-5, abs=1e-6)
    assert int(got[1]) == want.count and int(got[2]) == want.valid
    got = _core.triplet_terms(mining, labels, x, 0.2, "euclidean", False, ref, ref_labels, None)
    want = reference_terms(mining, labels, x.double(), 0.2, "euclidean", ref_embeddings=ref.double(),
                           ref_labels=ref_labels, anchor_offset=None)
    assert float(got[0]) == pytest.approx(float(want.sum), rel=1e-5, abs=1e-6)
    assert int(got[1]) == want.count and int(got[2]) == want.valid


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("row", ["anchors", "zeros", "ulp", "half-rounded", "copy-of-other"])
def test_an_anchor_whose_row_at_the_offset_holds_other_values_is_still_that_sample(mining, row,
                                                                                    portable):
    # anchor_offset=k: anchor i is reference k + i, never paired with
    # itself, whatever that row holds (a stale or unfilled memory-bank
    # entry, say); its distances and ties come from its own values. Ties
    # were taken from the row at the offset: unfilled zero rows of other
    # samples were put at distance 0 from the anchor.
    x = leaf(_embeddings(6))
    bank = _embeddings(7, n=5)
    bank[1] = 0.0  # an unfilled entry of another sample, a negative of anchor 3
    rows = torch.cat([bank[:2], x.detach(), bank[2:]])
    ref_labels = torch.cat([torch.tensor([3, 0]), LABELS, torch.tensor([0, 2, 1])])
    if row == "zeros":
        rows[2 + 3] = 0.0
    elif row == "ulp":
        rows[2 + 7, 4] = torch.nextafter(rows[2 + 7, 4], torch.tensor(math.inf))
    elif row == "half-rounded":
        rows = rows.half().float()
    elif row == "copy-of-other":
        rows[2 + 0] = x.detach()[5]  # anchor 0's row holds anchor 5's values
    ref = leaf(rows)
    sum_, count, valid = _core.triplet_terms(mining, LABELS, x, 0.2, "euclidean", False, ref,
                                             ref_labels, 2, portable=portable)
    want = reference_terms(mining, LABELS, x, 0.2, "euclidean", ref_embeddings=ref,
                           ref_labels=ref_labels, anchor_offset=2)
    assert float(sum_.detach()) == pytest.approx(float(want.sum.detach()), rel=1e-5, abs=1e-6)
    assert int(count) == want.count and int(valid) == want.valid
    got = torch.autograd.grad(sum_, (x, ref))
    wanted = torch.autograd.grad(want.sum, (x, ref))
    for g, w in zip(got, wanted):
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("mining", LOSSES)
def test_another_label_at_the_anchors_own_row_poisons_the_loss(mining, portable):
    # One sample with two labels: it would be its own negative.
    x = leaf(_embeddings(6))
    ref = leaf(torch.cat([_embeddings(7, n=2), x.detach()]))
    ref_labels = torch.cat([torch.tensor([3, 1]), LABELS])
    ref_labels[2 + 1] = 2
    sum_, _, _ = _core.triplet_terms(mining, LABELS, x, 0.2, "euclidean", False, ref,
                                     ref_labels, 2, portable=portable)
    assert math.isnan(float(sum_.detach()))
    gx, gref = torch.autograd.grad(sum_, (x, ref))
    assert torch.isnan(gx).all() and torch.isnan(gref).all()


# --------------------------------------------------------------------------- NaN in the gradients


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("bad", [NAN, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["anchor", "unused", "reference"])
def test_non_finite_input_reaches_loss_and_every_gradient(mining, distance, bad, where):
    x = _embeddings(7)
    bank = _embeddings(8)
    if where == "anchor":
        x[1, 2] = bad
    elif where == "unused":
        x[7, 0] = bad  # label 3 has one sample: no triplet uses it as an anchor's positive
    else:
        bank[4, 1] = bad
    x, bank = leaf(x), leaf(bank)
    kw = dict(ref_embeddings=bank, ref_labels=LABELS) if where == "reference" else {}
    loss = function_loss(mining, LABELS, x, 0.2, distance, **kw)
    assert math.isnan(loss.item())
    loss.backward()
    assert x.grad.isnan().all()
    if where == "reference":
        assert bank.grad.isnan().all()


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("bad", [NAN, math.inf, -math.inf, "overflow"])
@pytest.mark.parametrize("where", ["anchor", "unused anchor", "reference"])
def test_non_finite_input_with_references_reaches_every_gradient(mining, distance, bad, where, portable):
    # Anchors and references apart: a bad anchor must reach every reference's
    # gradient and a bad reference every anchor's, whichever triplets they form.
    x, bank = _embeddings(7, dtype=torch.float64), _embeddings(8, dtype=torch.float64)
    bank_labels = torch.tensor([0, 0, 1, 1, 2, 2, 4, 4])  # 3: the last anchor's, no reference has it
    row, col = {"anchor": (x, 1), "unused anchor": (x, 7), "reference": (bank, 5)}[where]
    if bad == "overflow":  # finite, but squared distances or the row's norm beyond float64
        row[col] = 1e308 if distance == "cosine" else 1e300
    else:
        row[col, 2] = bad
    x, bank = leaf(x), leaf(bank)
    s, _, _ = _core.triplet_terms(mining, LABELS, x, 0.2, distance, False, bank, bank_labels, None, None,
                                  portable=portable)
    gx, gy = torch.autograd.grad(s, (x, bank))
    assert math.isnan(s.item())
    assert gx.isnan().all() and gy.isnan().all()


# --------------------------------------------------------------------------- overflow and cancellation


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("scale", [1e6, 1e12, 1e17, 1e19, 1e20, 1e30])
def test_overflow_is_nan_or_right(mining, distance, scale):
    x = (_embeddings(9) * scale).float()
    want = function_loss(mining, LABELS, x.double(), 0.2, distance).item()
    got = function_loss(mining, LABELS, x, 0.2, distance).item()
    assert_overflow_is_nan_else_right(got, want, torch.float32, distance, x.double(), x.double(), 1e-3)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("scale", [1e-30, 1e20, 1e30, 1e38])
def test_metrics_do_not_overflow(distance, scale):
    g = torch.Generator().manual_seed(10)
    x = torch.randn(60, 4, generator=g)
    labels = torch.arange(60) % 6
    want = metrics.recall_at_k(x.double(), labels, ks=(1, 5), distance=distance)
    assert metrics.recall_at_k(x * scale, labels, ks=(1, 5), distance=distance) == want
    want_map = metrics.mean_average_precision_at_r(x.double(), labels, distance=distance)
    got_map = metrics.mean_average_precision_at_r(x * scale, labels, distance=distance)
    assert got_map == pytest.approx(want_map, rel=1e-6)


def _far_from_origin(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 16, generator=g, dtype=torch.float64) * 0.01 + 1000


def _unit_vectors_within_4_degrees(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pole = torch.zeros(16, 16, dtype=torch.float64)
    pole[:, 0] = 1
    tilt = torch.randn(16, 16, generator=g, dtype=torch.float64)
    tilt[:, 0] = 0
    tilt = tilt / tilt.norm(dim=1, keepdim=True) * torch.rand(16, 1, generator=g).double() \
        * math.radians(4)
    return torch.nn.functional.normalize(pole + tilt, dim=1)


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("distance", ["euclidean", "squared"])
@pytest.mark.parametrize("data", ["far", "near-parallel"])
@pytest.mark.parametrize("seed", range(3))
def test_float32_keeps_float64_precision_on_clustered_data(mining, distance, data, seed):
    x = _far_from_origin(seed) if data == "far" else _unit_vectors_within_4_degrees(seed)
    # float64 on the very points float32 holds: the computation is compared,
    # not the rounding of the inputs.
    x = x.float().double()
    labels = torch.arange(x.shape[0]) % 4
    margin = 0.01 if data == "far" else 0.001
    want = function_loss(mining, labels, x, margin, distance)
    got = function_loss(mining, labels, x.float(), margin, distance)
    assert got.item() == pytest.approx(want.item(), rel=1e-3, abs=1e-9)
    # The float64 value is itself right: it matches the brute-force reference.
    assert want.item() == pytest.approx(_ref_loss(mining, labels, x, margin, distance), rel=1e-9)


def _pairs_on_an_arc(seed: int, theta: float = 3e-3, delta: float = 3e-4) -> torch.Tensor:
    """Four classes of two rows each, in a plane of random orientation, at
    angles c·theta and c·theta + delta for class c, with random lengths:
    every anchor's positive is delta away and its nearest negative
    theta − delta (the next ones at least delta farther), so that float32
    selects as float64 does, while every cosine distance is below 2e-5."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0][:2]
    angles = torch.tensor([c * theta + k * delta for c in range(4) for k in range(2)],
                          dtype=torch.float64)
    lengths = torch.rand(8, 1, generator=g, dtype=torch.float64) * 3 + 0.5
    return torch.stack([angles.cos(), angles.sin()], dim=1) @ basis * lengths


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("seed", range(3))
def test_float32_batch_hard_cosine_keeps_the_digits_of_close_pairs(seed, portable):
    """Batch-hard's loss is computed from its selected pairs' distances,
    which for the cosine distance were 1 − x̂·ŷ: a dot product of about 1
    rounded to 6e-8 in float32, on distances of 5e-8 (positives) to 4e-6
    (negatives), a loss 1e-2 off. As ½‖x̂ − ŷ‖² it keeps float64's digits."""
    x = _pairs_on_an_arc(seed).float().double()
    labels = torch.arange(8) // 2
    margin = 1e-5  # every hinge active: about 6e-6 each

    def loss(x):
        return _core.triplet_terms("hard", labels, x, margin, "cosine", False, None, None, None,
                                   None, portable=portable)[0] / 8

    want = _ref_loss("hard", labels, x, margin, "cosine")
    assert loss(x).item() == pytest.approx(want, rel=1e-9)
    assert loss(x.float()).item() == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("dtype, offset", [(torch.float32, 1e20), (torch.float32, -3e35),
                                           (torch.float64, 1e30)])
def test_an_offset_every_embedding_shares_changes_nothing(mining, dtype, offset, portable):
    # Centred on a mean taken in the embeddings' dtype, a shared column of
    # 1e20 (float32) left a residual of about 9e12, whose Gram products lost
    # every digit of the differences: 0.73 instead of 2.54, silently.
    g = torch.Generator().manual_seed(8)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.arange(12) % 3
    shifted = leaf(torch.cat([torch.full((12, 1), offset, dtype=dtype), x], dim=1))
    plain = leaf(torch.cat([torch.zeros(12, 1, dtype=dtype), x], dim=1))
    got, want = (_core.triplet_terms(mining, labels, e, 0.5, "euclidean", False, None, None,
                                     None, None, portable=portable)[0] for e in (shifted, plain))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, shifted)[0],
                               torch.autograd.grad(want, plain)[0])


@pytest.mark.parametrize("seed", range(3))
def test_metrics_keep_float64_rankings_far_from_origin(seed):
    x = _far_from_origin(seed).float().double()
    labels = torch.arange(x.shape[0]) % 4
    assert metrics.recall_at_k(x.float(), labels, ks=(1, 3)) == \
        metrics.recall_at_k(x, labels, ks=(1, 3))


# --------------------------------------------------------------------------- the binding's arguments


@pytest.mark.parametrize("offset", [2**62, 2**63 - 1, -1, -(2**63)])
def test_anchor_offset_far_out_of_range_is_a_value_error(offset):
    x = _embeddings(11)
    with pytest.raises(ValueError, match=r"^anchor_offset: "):
        _core.triplet_terms("all", LABELS, x, 0.2, "euclidean", False, x, LABELS, offset)


@pytest.mark.parametrize("shapes", [((2,), (), ()), ((), (3,), ()), ((), (), (1, 1))])
def test_mean_and_fraction_rejects_fields_of_other_shapes(shapes):
    s, c, v = (torch.ones(shape) for shape in shapes)
    with pytest.raises(ValueError):
        _core.mean_and_fraction(s, c.long(), v.long(), torch.zeros(()))


@pytest.mark.parametrize("mining,soft", [("all", False), ("semihard", False), ("hard", False),
                                         ("hard", True)])
@pytest.mark.parametrize("distance", DISTANCES)
def test_margin_tensor_gets_the_exact_derivative(mining, distance, soft):
    x = _embeddings(12, n=8, d=3, dtype=torch.float64)
    margin = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    s, c, _ = _core.triplet_terms(mining, LABELS, x, 0.7, distance, soft, margin_tensor=margin)
    (grad,) = torch.autograd.grad(s, margin)
    # Reference: the reference sum's derivative in the margin, by autograd
    # through a float64 margin tensor.
    m = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    want = reference_terms(mining, LABELS, x, m, distance, soft=soft).sum
    (want_grad,) = torch.autograd.grad(want, m, allow_unused=True)
    want_grad = torch.zeros(()) if want_grad is None else want_grad
    assert grad.item() == pytest.approx(want_grad.item(), rel=1e-9, abs=1e-12)
    assert s.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)


def test_margin_tensor_must_be_one_element():
    with pytest.raises(ValueError, match=r"^margin: "):
        _core.triplet_terms("all", LABELS, _embeddings(0), 0.2, "euclidean", False,
                            margin_tensor=torch.ones(2))


@pytest.mark.parametrize("big", [2**53 + 1, -(2**63)])
@pytest.mark.parametrize("side", ["labels", "extra_labels"])
def test_distributed_extra_references_refuse_big_ints_against_floats(big, side):
    # DistributedTripletLoss concatenates its batch with the extra references
    # before the core sees them: the mix is refused there too.
    from online_triplet_loss.distributed import DistributedTripletLoss
    from online_triplet_loss import BatchHardTripletLoss

    ints = torch.tensor([big, big, 5, 5])
    floats = torch.tensor([5.0, 5.0, 7.0, 7.0], dtype=torch.float64)
    labels, extra = (ints, floats) if side == "labels" else (floats, ints)
    loss = DistributedTripletLoss(BatchHardTripletLoss(margin=0.2))
    with pytest.raises(ValueError, match=rf"^{side}: "):
        loss(_embeddings(13, n=4), labels, extra_embeddings=_embeddings(14, n=4),
             extra_labels=extra)


# --------------------------------------------------------------------------- underflow


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("distance", ["euclidean", "squared"])
@pytest.mark.parametrize("dtype, exponent, nan", [
    (torch.float32, -40, False), (torch.float32, -100, True), (torch.float32, -130, True),
    (torch.float64, -480, False), (torch.float64, -540, True),
])
def test_embeddings_whose_squares_underflow_give_nan(mining, distance, dtype, exponent, nan, portable):
    # With margin 0 a Euclidean loss is homogeneous: at s·x (s a power of two)
    # it is s times the loss at x (s² for squared) with the same gradient (s
    # times). Below the square root of the smallest normal number the squares
    # of the entries underflow and every Gram distance comes out 0: NaN then,
    # never a loss of 0.
    x = _embeddings(11, dtype=dtype)
    s = 2.0 ** exponent
    power = 2 if distance == "squared" else 1
    loss1, _, _ = _core.triplet_terms(mining, LABELS, leaf(x), 0.0, distance, False, None, None, None, None,
                                      portable=portable)
    xs = leaf(x * s)
    loss, _, _ = _core.triplet_terms(mining, LABELS, xs, 0.0, distance, False, None, None, None, None,
                                     portable=portable)
    (g,) = torch.autograd.grad(loss, xs)
    if nan:
        assert math.isnan(loss.item()) and g.isnan().all()
    else:
        assert loss.item() / s ** power == pytest.approx(loss1.item(), rel=1e-4)
        assert g.isfinite().all()


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e-13), (torch.float32, 1e-30),
                                          (torch.float64, 1e-142)])
def test_identical_tiny_embeddings_are_not_poisoned(dtype, scale, portable):
    # All rows equal: a degenerate batch, every distance 0, loss = margin. Seven
    # rows, whose mean rounds, so centred points are not exactly 0. Also with
    # the references apart, and with an empty side, where no distance exists.
    g = torch.Generator().manual_seed(5)
    row = torch.rand(16, generator=g, dtype=torch.float64).to(dtype) * scale
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    x = leaf(row.expand(7, 16).clone())
    cases = [(x, None, None), (x[:3], row.expand(4, 16), labels[3:]),
             (x[:4], row[:0].reshape(0, 16), labels[:0]), (x[:0], row.expand(4, 16), labels[:4])]
    for anchors, refs, ref_labels in cases:
        for mining in LOSSES:
            s, c, _ = _core.triplet_terms(mining, labels[:anchors.shape[0]], anchors, 0.2, "euclidean", False,
                                          refs, ref_labels, None, None, portable=portable)
            assert not math.isnan(s.item()), (mining, anchors.shape, refs is None)
            if c.item() > 0:
                assert s.item() / c.item() == pytest.approx(0.2)


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("distance", DISTANCES)
def test_fraction_is_nan_when_the_loss_is(distance, portable):
    # Its counts come from comparisons of NaN distances, which the paths make
    # differently: NaN, like the loss.
    x = _embeddings(12)
    x[2, 1] = NAN
    s, c, v = _core.triplet_terms("all", LABELS, x, 0.2, distance, False, None, None, None, None,
                                  portable=portable)
    loss, fraction = _core.mean_and_fraction(s, c, v, x)
    assert math.isnan(loss.item()) and math.isnan(fraction.item())


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("mining", LOSSES)
def test_cosine_of_identical_zero_rows_is_one(mining, portable):
    # Rows below the normalisation floor are not unit vectors: two zero rows
    # are at cosine distance 1, not 0, though they are identical. Rows of one
    # direction are at 0, up to rounding.
    x = _embeddings(13, dtype=torch.float64)
    x[0] = 0.0
    x[1] = 0.0  # label 0, as row 0
    x[4] = 3.0 * x[3]  # label 1, as row 3
    x[6] = 0.0  # label 2: zero rows of different labels
    for refs in (False, True):
        kw = dict(ref_embeddings=x.flip(0), ref_labels=LABELS.flip(0)) if refs else {}
        want = reference_terms(mining, LABELS, x, 0.2, "cosine", anchor_offset=None, **kw)
        s, c, v = _core.triplet_terms(mining, LABELS, leaf(x), 0.2, "cosine", False,
                                      kw.get("ref_embeddings"), kw.get("ref_labels"), None, None,
                                      portable=portable)
        assert float(s) == pytest.approx(float(want.sum), rel=1e-9, abs=1e-12), refs
        assert (int(c), int(v)) == (want.count, want.valid), refs


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
def test_cosine_copies_do_not_depend_on_the_layout(portable):
    # Anchor 0's one positive is its exact copy among references apart, the
    # negative is orthogonal (d_an = 1 exactly): at margin 1 batch-all counts
    # nothing, whether the anchors are contiguous or column-major (what a
    # (W @ h.T).T head gives), whose norms libtorch rounds differently.
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        d = 33 + seed
        y = torch.randn(6, d, generator=g)
        y[:, -1] = 0
        negative = torch.zeros(1, d)
        negative[0, -1] = 1
        refs, ref_labels = torch.cat([y[:1], negative]), torch.tensor([0, 1])
        labels = torch.tensor([0, 2, 2, 2, 2, 2])
        for x in (y.clone(), y.t().contiguous().t()):
            s, c, v = _core.triplet_terms("all", labels, x, 1.0, "cosine", False, refs, ref_labels, None,
                                          None, portable=portable)
            assert (float(s), int(c), int(v)) == (0.0, 0, 1), (seed, x.stride())


_EXIT_DURING_A_CALL = """
import sys, threading, time
import torch
from online_triplet_loss import batch_all_triplet_loss
from online_triplet_loss.metrics import recall_at_k

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x, y = torch.randn(30_000, 16, generator=g), torch.randint(0, 300, (30_000,), generator=g)
calls = {"metric": lambda: recall_at_k(x, y, (1,)),
         "loss": lambda: batch_all_triplet_loss(y, x.requires_grad_(), 0.2)[0].backward()}
entered = threading.Event()
def work():
    entered.set()
    calls[sys.argv[1]]()
thread = threading.Thread(target=work, daemon=True)
thread.start()
entered.wait()
time.sleep(0.3)
print("exiting" if thread.is_alive() else "the call ended before the exit")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX threads")
@pytest.mark.parametrize("call", ["metric", "loss"])
def test_interpreter_exit_while_a_daemon_thread_is_in_the_core(call):
    """Before Python 3.14 a thread that takes the GIL back while the
    interpreter shuts down is ended by pthread_exit, whose unwinding through
    the extension's Rust frames aborted the process ("FATAL: exception not
    rethrown", SIGABRT) when the program exited during a loss or a metric
    on a daemon thread. It exits normally, as with torch's own operations."""
    proc = subprocess.run([sys.executable, "-c", _EXIT_DURING_A_CALL, call], capture_output=True,
                          text=True, timeout=300)
    assert (proc.returncode, proc.stdout.strip()) == (0, "exiting"), proc.stdout + proc.stderr


def _misaligned(values: torch.Tensor) -> torch.Tensor:
    """int64 `values` in storage one byte off int64's alignment, as
    ``torch.frombuffer`` with an offset gives (torch accepts it)."""
    out = torch.frombuffer(bytearray(8 * len(values) + 1), dtype=torch.int64, offset=1,
                           count=len(values))
    out.copy_(values)
    assert out.data_ptr() % 8 != 0
    return out


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("portable", [False, True])
def test_misaligned_labels_give_what_aligned_ones_give(mining, portable):
    """The native kernels read the labels as a slice of int64, which must be
    aligned; the core keeps its own copy of the keys, never the caller's
    storage (reading that would be undefined behaviour)."""
    labels = torch.arange(600) % 7
    x = _embeddings(3, n=600)
    refs = _embeddings(4, n=300)
    for kw in ({}, {"ref_embeddings": refs, "ref_labels": labels[:300]}):
        want = _core.triplet_terms(mining, labels, x, 0.2, "euclidean", False, portable=portable,
                                   chunk_size=64, **kw)
        odd = {k: _misaligned(v) if k == "ref_labels" else v for k, v in kw.items()}
        got = _core.triplet_terms(mining, _misaligned(labels), x, 0.2, "euclidean", False,
                                  portable=portable, chunk_size=64, **odd)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    assert metrics.recall_at_k(x, _misaligned(labels), (1, 5)) == metrics.recall_at_k(x, labels, (1, 5))
    assert (metrics.mean_average_precision_at_r(x, _misaligned(labels))
            == metrics.mean_average_precision_at_r(x, labels))


def _misaligned_floats(values: torch.Tensor) -> torch.Tensor:
    """float32 `values` in storage one byte off float32's alignment."""
    out = torch.frombuffer(bytearray(4 * values.numel() + 1), dtype=torch.float32, offset=1,
                           count=values.numel()).view(values.shape)
    out.copy_(values)
    assert out.data_ptr() % 4 != 0 and out.is_contiguous()
    return out


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
def test_negated_views_and_misaligned_embeddings_give_what_plain_ones_give(mining, distance,
                                                                          portable):
    """Identical rows are found from a copy the core owns, never from the
    caller's storage: a negated view (torch._neg_view, whose storage holds
    the values' negatives) and float32 storage off its alignment give what
    their plain copies give, with references holding copies of the anchors
    and of each other (a review: the negated view's rows were hashed
    un-negated, so rows equal to -ref were tied to ref)."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 4, generator=g)
    refs = torch.cat([base, base[:3]])  # copies among the references
    ref_labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 0])
    x, labels = -base[:4], torch.tensor([0, 0, 1, 1])  # anchors equal to -ref
    x = torch.cat([x, base[4:]])
    labels = torch.cat([labels, torch.tensor([2, 1])])
    want = _core.triplet_terms(mining, labels, x, 0.3, distance, False, portable=portable,
                               ref_embeddings=refs, ref_labels=ref_labels)
    assert int(want[1]) > 0
    odd = [
        (x, torch._neg_view(-refs)),
        (torch._neg_view(-x), refs),
        (_misaligned_floats(x), _misaligned_floats(refs)),
    ]
    for anchors, references in odd:
        got = _core.triplet_terms(mining, labels, anchors, 0.3, distance, False,
                                  portable=portable, ref_embeddings=references,
                                  ref_labels=ref_labels)
        for a, b in zip(got, want):
            assert torch.equal(a, b), (mining, distance, got, want)
    both = torch._neg_view(-torch.cat([x, refs]))
    got = _core.triplet_terms(mining, torch.cat([labels, ref_labels]), both, 0.3, distance, False,
                              portable=portable)
    want = _core.triplet_terms(mining, torch.cat([labels, ref_labels]), both.resolve_neg(), 0.3,
                               distance, False, portable=portable)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mining", ["all", "semihard"])
@pytest.mark.parametrize("which", ["embeddings", "ref_embeddings", "margin"])
def test_the_core_refuses_forward_mode_tangents_through_batch_all_and_semihard(mining, which):
    """The Python functions raise before calling the core; the core itself
    (what Rust users call) refuses a tangent on any input of the losses
    whose gradient is reverse-mode only, instead of a silently zero or
    partial derivative (a review: references with a tangent and no
    requires_grad lost theirs)."""
    import torch.autograd.forward_ad as fwAD

    x, refs = _embeddings(1, n=6), _embeddings(2, n=6)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    margin = torch.tensor(0.3)
    with fwAD.dual_level():
        inputs = {"embeddings": x, "ref_embeddings": refs, "margin": margin}
        inputs[which] = fwAD.make_dual(inputs[which], torch.ones_like(inputs[which]))
        with pytest.raises(ValueError, match=f"{which}.*forward-mode AD tangent"):
            _core.triplet_terms(mining, labels, inputs["embeddings"], 0.3, "euclidean", False,
                                ref_embeddings=inputs["ref_embeddings"], ref_labels=labels,
                                margin_tensor=inputs["margin"])


@pytest.mark.parametrize("mining, how", [(m, "margin") for m in LOSSES]
                         + [("all", "squared"), ("hard", "squared")])
def test_hinges_whose_sum_overflows_the_dtype_give_their_mean(mining, how):
    # Finite inputs whose hinges sum past float32's range, while their mean
    # fits: the sum is kept in float64 (in float32 it was inf, and batch-all's
    # fraction NaN).
    x = _embeddings(8, n=64)
    labels = torch.arange(64) % 4
    margin, distance = (5e37, "euclidean") if how == "margin" else (0.2, "squared")
    if how == "squared":
        x = x * 1e18  # squared distances up to about 1e38
    x = leaf(x)
    want = reference_terms(mining, labels, x.double(), margin, distance)
    big = torch.finfo(torch.float32).max
    assert float(want.sum.detach()) > big  # the case: the sum does not fit float32
    mean = float(want.sum.detach()) / want.count
    assert mean < big  # ... and its mean does
    if mining == "all":
        loss, fraction = batch_all_triplet_loss(labels, x, margin, distance=distance)
        assert fraction.item() == pytest.approx(want.count / want.valid, rel=1e-6)
    else:
        loss = function_loss(mining, labels, x, margin, distance)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(mean, rel=1e-5)
    (g,) = torch.autograd.grad(loss, x)
    (w,) = torch.autograd.grad(float(want.count) ** -1 * want.sum, x)
    torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("chunk", [None, 8, 3])
@pytest.mark.parametrize("negatives, margin", [(32, 2e38), (512, 2e37)])
def test_hinges_that_overflow_a_float32_lane_give_their_mean(negatives, margin, chunk, portable):
    # The native kernels add float32 hinges lane by lane (up to a block's or
    # a tile's) before float64 takes over: a lane that overflowed is summed
    # again in float64, or the batch goes to the kernels that do.
    labels = torch.tensor([0, 0] + [1] * negatives)
    x = leaf(torch.randn(2 + negatives, 4, generator=torch.Generator().manual_seed(3)))
    want = reference_terms("all", labels, x.double(), margin, "euclidean")
    assert float(want.sum.detach()) / want.count < torch.finfo(torch.float32).max
    s, c, v = _core.triplet_terms("all", labels, x, margin, "euclidean", False, None, None, None,
                                  chunk, portable=portable)
    assert (int(c), int(v)) == (want.count, want.valid)
    assert float(s.detach()) == pytest.approx(float(want.sum.detach()), rel=1e-6)
    (g,) = torch.autograd.grad(s, x)
    (w,) = torch.autograd.grad(want.sum, x)
    torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-3)
