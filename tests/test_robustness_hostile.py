"""Hostile input, as an adversarial pass found it: other cases of the classes
that the robustness tests cover (layouts, autograd modes, entry points, label
mixes, overflow, settings).

References are float64 brute force (``reference.py``) or the definitions
(ValueError/TypeError naming the argument, NaN out for NaN in, torch's
global state unchanged after an error)."""

from __future__ import annotations

import datetime
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from online_triplet_loss import (
    BatchAllTripletLoss,
    BatchHardTripletLoss,
    BatchSemiHardTripletLoss,
    CrossBatchMemory,
    PKSampler,
    _core,
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    metrics,
)
from online_triplet_loss.distributed import DistributedTripletLoss
from online_triplet_loss.losses import terms
from helpers import DISTANCES, LOSSES, assert_overflow_is_nan_else_right, function_loss, make_module
from test_memory import reference_loss as memory_reference_loss
from reference import reference_terms

LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
NAN = float("nan")
PANIC_WORDS = ("panicked", "unwrap", "frame #", "RUST_BACKTRACE")


def _x(seed=0, n=8, d=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)


def _ref(mining, labels, x, margin, distance, **kw):
    return reference_terms(mining, labels, x.double(), margin, distance, **kw).loss.item()


def _state():
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.get_num_threads())


def _no_panic(capfd):
    err = capfd.readouterr().err
    for word in PANIC_WORDS:
        assert word not in err, err[-2000:]


def _named_error(call, name):
    """The call raises a ValueError/TypeError whose message names ``name``."""
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert name in str(info.value), str(info.value)
    for word in ("Exception raised from", "frame #", "c10::", "libtorch", "unwrap"):
        assert word not in str(info.value), str(info.value)[:2000]


# =========================================================================== item 1 + 2
# Bad inputs of other kinds, under every grad mode: a named error, no panic,
# and grad mode / inference mode / threads as they were.

def _bad_inputs():
    x = _x()
    out = {
        "complex-embeddings": ("embeddings", lambda: (LABELS, x.to(torch.complex64))),
        "int-embeddings": ("embeddings", lambda: (LABELS, (x * 10).long())),
        "bool-embeddings": ("embeddings", lambda: (LABELS, x > 0)),
        "3d-embeddings": ("embeddings", lambda: (LABELS, x.unsqueeze(-1))),
        "1d-embeddings": ("embeddings", lambda: (LABELS, x[:, 0])),
        "sparse-csr-embeddings": ("embeddings", lambda: (LABELS, x.to_sparse_csr())),
        "float8e5m2-embeddings": ("embeddings", lambda: (LABELS, x.to(torch.float8_e5m2))),
        "meta-embeddings": ("embeddings", lambda: (LABELS, x.to("meta"))),
        "quantized-embeddings": ("embeddings", lambda: (
            LABELS, torch.quantize_per_tensor(x, 0.1, 0, torch.qint8))),
        "nested-embeddings": ("embeddings", lambda: (
            LABELS, torch.nested.nested_tensor([x[0], x[1]]))),
        "meta-labels": ("labels", lambda: (LABELS.to("meta"), x)),
        "sparse-labels": ("labels", lambda: (LABELS.to_sparse(), x)),
        "complex-labels": ("labels", lambda: (LABELS.to(torch.complex64), x)),
        "2d-labels": ("labels", lambda: (LABELS.unsqueeze(1), x)),
        "short-labels": ("labels", lambda: (LABELS[:5], x)),
        "uint32-labels": ("labels", lambda: (LABELS.to(torch.uint32), x)),
        "float8-labels": ("labels", lambda: (LABELS.to(torch.float8_e4m3fn), x)),
        "numpy-embeddings": ("embeddings", lambda: (LABELS, x.numpy())),
        "list-labels": ("labels", lambda: (LABELS.tolist(), x)),
    }
    return out


BAD_INPUTS = _bad_inputs()
MODES = {
    "grad": lambda: torch.enable_grad(),
    "no_grad": lambda: torch.no_grad(),
    "inference": lambda: torch.inference_mode(),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_inputs_named_error_no_panic_state_kept(name, mining, mode, capfd):
    argument, make = BAD_INPUTS[name]
    labels, x = make()
    for distance in ("euclidean", "cosine"):
        with MODES[mode]():
            before = _state()
            _named_error(lambda: function_loss(mining, labels, x, 0.2, distance), argument)
            assert _state() == before
    _no_panic(capfd)


BAD_REFS = {
    "meta-ref": lambda x: (x.to("meta"), LABELS),
    "uint16-ref-labels": lambda x: (x, LABELS.to(torch.uint16)),
    "sparse-ref": lambda x: (x.to_sparse(), LABELS),
    "complex-ref": lambda x: (x.to(torch.complex64), LABELS),
    "wide-ref": lambda x: (torch.cat([x, x], 1), LABELS),
    "short-ref-labels": lambda x: (x, LABELS[:3]),
    "int-ref": lambda x: ((x * 10).long(), LABELS),
}


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("name", sorted(BAD_REFS))
def test_bad_references_named_error(name, mining, capfd):
    x = _x().requires_grad_()
    ref, ref_labels = BAD_REFS[name](_x(1))
    with torch.no_grad():
        with torch.enable_grad():  # enable_grad inside no_grad
            before = _state()
            with pytest.raises((ValueError, TypeError)) as info:
                function_loss(mining, LABELS, x, 0.2, "euclidean", ref_embeddings=ref,
                              ref_labels=ref_labels)
            assert "ref_" in str(info.value), str(info.value)
            assert _state() == before
        assert not torch.is_grad_enabled()
    _no_panic(capfd)


@pytest.mark.parametrize("what", ["recall", "map"])
@pytest.mark.parametrize("name", ["meta", "complex", "zero-width-cosine", "uint64-labels",
                                  "sparse", "float8"])
def test_metric_failures_keep_grad_mode(name, what, capfd):
    x, y = _x(n=12, d=3), torch.arange(12) % 3
    distance = "euclidean"
    if name == "meta":
        x = x.to("meta")
    elif name == "complex":
        x = x.to(torch.complex64)
    elif name == "zero-width-cosine":
        x, distance = torch.randn(12, 0), "cosine"
    elif name == "uint64-labels":
        y = y.to(torch.uint64)
    elif name == "sparse":
        x = x.to_sparse()
    else:
        x = x.to(torch.float8_e4m3fn)
    call = (lambda: metrics.recall_at_k(x, y, ks=(1,), distance=distance)) if what == "recall" \
        else (lambda: metrics.mean_average_precision_at_r(x, y, distance=distance))
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            before = _state()
            try:
                result = call()
            except (ValueError, TypeError):
                pass
            else:  # a supported case must give a valid number
                values = result.values() if isinstance(result, dict) else [result]
                assert all(0.0 <= v <= 1.0 for v in values), result
            assert _state() == before
    _no_panic(capfd)


def test_grad_mode_kept_after_failure_inside_module_memory_and_distributed(capfd):
    bad = _x().to(torch.complex64)
    for criterion in (BatchHardTripletLoss(margin=0.2, distance="cosine"),
                      DistributedTripletLoss(BatchAllTripletLoss(margin=0.2)),
                      CrossBatchMemory(BatchSemiHardTripletLoss(margin=0.2), memory_size=4)):
        for mode in MODES.values():
            with mode():
                before = _state()
                with pytest.raises((ValueError, TypeError)):
                    criterion(bad, LABELS)
                assert _state() == before
    # enqueue with a bad batch inside inference mode
    memory = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=4)
    memory(_x(), LABELS)
    with torch.inference_mode():
        with pytest.raises((ValueError, TypeError)):
            memory.enqueue(_x(d=3), LABELS)
        assert torch.is_inference_mode_enabled()
    _no_panic(capfd)


# =========================================================================== item 2: layouts that are fine

def _layouts():
    base = _x(2, n=8, d=6)
    return {
        "transposed": base.t().contiguous().t(),
        "column-slice": torch.cat([base, base], 1)[:, ::2],
        "row-slice": torch.cat([base, base])[::2],
        "flipped": base.flip(0).flip(0),
        "expanded": base[:1].expand(8, 6),
        "channels-last-view": base.reshape(2, 4, 6, 1).to(memory_format=torch.channels_last)
        .reshape(8, 6),
        "offset-storage": torch.cat([torch.zeros(1, 6, dtype=base.dtype), base])[1:],
    }


LAYOUTS = _layouts()


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_strided_layouts_give_the_contiguous_result(layout, mining, distance):
    x = LAYOUTS[layout]
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    labels_nc = torch.stack([labels, labels], 1)[:, 1]  # non-contiguous labels
    xs = x.detach().requires_grad_() if x.is_contiguous() else x
    want = function_loss(mining, labels, x.contiguous().double(), 0.2, distance)
    got = function_loss(mining, labels_nc, xs, 0.2, distance)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    # and as the reference set, against itself
    got = function_loss(mining, labels, x.contiguous(), 0.2, distance, ref_embeddings=x,
                        ref_labels=labels_nc, anchor_offset=0)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mining", LOSSES)
def test_expanded_leaf_gradient_matches(mining):
    # A gradient through an expand (stride 0): must equal the gradient through a copy.
    row = _x(3, n=1, d=4).requires_grad_()
    others = _x(4, n=5, d=4)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 0])
    x = torch.cat([row.expand(3, 4), others])
    loss = function_loss(mining, labels, x, 0.5, "euclidean")
    (g,) = torch.autograd.grad(loss, row)
    row2 = row.detach().clone().requires_grad_()
    x2 = torch.cat([row2.repeat(3, 1), others])
    (g2,) = torch.autograd.grad(function_loss(mining, labels, x2, 0.5, "euclidean"), row2)
    torch.testing.assert_close(g, g2)


# =========================================================================== item 3: second derivatives

@pytest.mark.parametrize("mining", ["all", "semihard"])
def test_hessian_functional_raises(mining):
    x = _x(5, n=6, d=3).double()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.functional.hessian(
            lambda e: function_loss(mining, labels, e, 1.0, "euclidean"), x)


@pytest.mark.parametrize("mining", ["all", "semihard"])
def test_double_backward_through_distributed_wrapper_raises(mining):
    x = _x(5, n=6, d=3).double().requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = DistributedTripletLoss(make_module(mining, 1.0, "squared"))(x, labels)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(g.pow(2).sum(), x)


@pytest.mark.parametrize("mining", ["all", "semihard"])
def test_double_backward_only_through_reference_raises(mining):
    x = _x(5, n=6, d=3).double()
    ref = _x(6, n=6, d=3).double().requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = function_loss(mining, labels, x, 1.0, "euclidean", ref_embeddings=ref, ref_labels=labels)
    (g,) = torch.autograd.grad(loss, ref, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(g.sum() * 3 + g.pow(2).sum(), ref)


@pytest.mark.parametrize("mining", ["all", "semihard"])
def test_double_backward_margin_raises(mining):
    x = _x(5, n=6, d=3).double().requires_grad_()
    margin = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = function_loss(mining, labels, x, margin, "euclidean")
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(gx.pow(2).sum(), margin)


@pytest.mark.parametrize("mining", LOSSES)
def test_jacobian_first_order_works(mining):
    x = _x(5, n=6, d=3).double()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    jac = torch.autograd.functional.jacobian(
        lambda e: function_loss(mining, labels, e, 1.0, "euclidean"), x)
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(function_loss(mining, labels, xr, 1.0, "euclidean"), xr)
    torch.testing.assert_close(jac, g)


@pytest.mark.parametrize("distance", DISTANCES)
def test_batch_hard_gradgradcheck_with_references_and_margin(distance):
    x = (_x(7, n=6, d=3).double() * 1.3).requires_grad_()
    ref = _x(8, n=5, d=3).double().requires_grad_()
    margin = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    ref_labels = torch.tensor([0, 1, 2, 0, 1])

    def f(a, b, m):
        return batch_hard_triplet_loss(labels, a, m, distance=distance, soft=True,
                                       ref_embeddings=b, ref_labels=ref_labels)
    assert torch.autograd.gradgradcheck(f, (x, ref, margin))


# =========================================================================== item 4: label mixes

def _mix(dtype_a, dtype_b, mining):
    x, bank = _x(3), _x(4)
    ref = torch.cat([x, bank])
    ref_labels = torch.cat([LABELS, LABELS.flip(0)])
    want = _ref(mining, LABELS, x, 0.2, "euclidean", ref_embeddings=ref, ref_labels=ref_labels)
    got = function_loss(mining, LABELS.to(dtype_a), x, 0.2, "euclidean",
                        ref_embeddings=ref, ref_labels=ref_labels.to(dtype_b))
    return got.item(), want


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("a, b", [
    (torch.int8, torch.float16), (torch.int16, torch.bfloat16), (torch.float16, torch.int8),
    (torch.uint8, torch.float32), (torch.int32, torch.float64),
])
def test_more_label_dtype_mixes(mining, a, b):
    got, want = _mix(a, b, mining)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mining", LOSSES)
def test_bool_labels_against_float_labels(mining):
    labels = torch.tensor([True, True, False, False, True, False])
    x = _x(5, n=6)
    ref = _x(6, n=6)
    want = _ref(mining, labels.long(), x, 0.3, "euclidean", ref_embeddings=ref,
                ref_labels=labels.long().flip(0))
    got = function_loss(mining, labels, x, 0.3, "euclidean", ref_embeddings=ref,
                        ref_labels=labels.flip(0).double())
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("big", [2**53 + 1, 2**62, -(2**63)])
def test_large_int_labels_against_float_labels_are_refused(mining, big):
    """int64 labels beyond 2**53 cannot be compared exactly with float labels:
    the mix is a ValueError naming the integer side (the issue allows this),
    never two classes merged by a conversion to float64."""
    labels = torch.tensor([big, big, 5, 5, 7, 7], dtype=torch.int64)
    x, ref = _x(9, n=6), _x(10, n=6)
    floats = torch.tensor([5.0, 7.0, 5.0, 7.0, 5.0, 7.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^labels: "):
        function_loss(mining, labels, x, 0.3, "euclidean", ref_embeddings=ref, ref_labels=floats)
    with pytest.raises(ValueError, match=r"^ref_labels: "):
        function_loss(mining, floats, x, 0.3, "euclidean", ref_embeddings=ref, ref_labels=labels)
    # Within ±2**53 the mix compares by value.
    small = torch.tensor([2**53, 2**53, 5, 5, 7, 7], dtype=torch.int64)
    want = _ref(mining, small, x, 0.3, "euclidean", ref_embeddings=ref,
                ref_labels=torch.tensor([5, 7, 5, 7, 5, 7]))
    got = function_loss(mining, small, x, 0.3, "euclidean", ref_embeddings=ref, ref_labels=floats)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mining", LOSSES)
def test_float16_rounded_label_is_not_the_int_label(mining):
    """int label 2049 and float16 label 2048.0 are different values."""
    labels = torch.tensor([2049, 2049, 3, 3, 2048, 2048])
    ref_labels = torch.tensor([2048.0, 2048.0, 3.0, 3.0, 2048.0, 2048.0], dtype=torch.float16)
    x, ref = _x(11, n=6), _x(12, n=6)
    want = _ref(mining, labels, x, 0.3, "euclidean", ref_embeddings=ref,
                ref_labels=torch.tensor([2048, 2048, 3, 3, 2048, 2048]))
    got = function_loss(mining, labels, x, 0.3, "euclidean", ref_embeddings=ref,
                        ref_labels=ref_labels)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mining", LOSSES)
def test_inf_labels_are_one_class_and_labels_requiring_grad(mining):
    labels = torch.tensor([math.inf, math.inf, -math.inf, -math.inf, 1.0, 1.0],
                          requires_grad=True)
    x = _x(13, n=6)
    want = _ref(mining, torch.tensor([9, 9, -9, -9, 1, 1]), x, 0.3, "euclidean")
    got = function_loss(mining, labels, x, 0.3, "euclidean")
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


# =========================================================================== item 5: PKSampler

def _batches(labels, p=2, k=2):
    return [sorted(b) for b in PKSampler(labels, p=p, k=k, seed=3)]


PLAIN = [0, 0, 1, 1, 2, 2, 3, 3]
FORMS = {
    "0d-float-tensors": lambda: [torch.tensor(float(v)) for v in PLAIN],
    "0d-uint8-tensors": lambda: [torch.tensor(v, dtype=torch.uint8) for v in PLAIN],
    "0d-tensors-requiring-grad": lambda: [torch.tensor(float(v), requires_grad=True)
                                          for v in PLAIN],
    "mixed-tensor-int-npint-float": lambda: [
        [torch.tensor(v), v, np.int64(v), float(v)][i % 4] for i, v in enumerate(PLAIN)],
    "np-float32": lambda: [np.float32(v) for v in PLAIN],
    "np-0d-arrays": lambda: [np.array(v) for v in PLAIN],
    "np-object-array-of-tensors": lambda: np.array([torch.tensor(v) for v in PLAIN] + [None],
                                                   dtype=object)[:-1],
    "tuple-of-np-bool-like": lambda: tuple(np.int16(v) for v in PLAIN),
    "float-tensor-negative-zero": lambda: torch.tensor([-0.0 if v == 0 else float(v)
                                                        for v in PLAIN]),
    "tensor-0d-negative-zero": lambda: [torch.tensor(-0.0) if v == 0 else torch.tensor(v)
                                        for v in PLAIN],
}


@pytest.mark.parametrize("name", sorted(FORMS))
def test_pksampler_label_forms(name):
    assert _batches(FORMS[name]()) == _batches(PLAIN)


def test_pksampler_bool_tensors_and_bools():
    plain = [0, 0, 1, 1]
    assert _batches([torch.tensor(bool(v)) for v in plain]) == _batches(plain)
    assert _batches([np.bool_(v) for v in plain]) == _batches(plain)


def test_pksampler_nan_tensors_are_distinct():
    labels = [torch.tensor(NAN), torch.tensor(NAN), 1.0, 1.0]
    # two NaN classes of one sample each, one class of two: 3 classes
    sampler = PKSampler(labels, p=3, k=2, seed=0)
    for batch in sampler:
        assert len(batch) == 6


# =========================================================================== item 6: CrossBatchMemory

@pytest.mark.parametrize("mining", LOSSES)
def test_memory_rows_that_overflow_in_the_memory_dtype_are_not_stored(mining):
    """The memory takes the first batch's dtype (float16 here); a later
    float32 row of 1e6 becomes Inf when stored and would poison every later
    loss."""
    memory = CrossBatchMemory(make_module(mining, 0.2, "cosine"), memory_size=32)
    memory(_x(1).half(), LABELS)
    big = _x(2)
    big[3] *= 1e6
    memory(big, LABELS)
    emb, _ = memory.memory
    assert torch.isfinite(emb).all(), "an Inf row was stored"
    loss = memory(_x(3), LABELS)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("mining", LOSSES)
def test_memory_state_dict_with_nonfinite_rows_is_refused(mining):
    """A checkpoint whose stored rows hold NaN would make every later loss NaN."""
    memory = CrossBatchMemory(make_module(mining, 0.2, "euclidean"), memory_size=8)
    memory(_x(1), LABELS)
    state = memory.state_dict()
    state["memory_embeddings"][2, 1] = NAN
    other = CrossBatchMemory(make_module(mining, 0.2, "euclidean"), memory_size=8)
    with pytest.raises(ValueError, match="^state_dict: .*NaN or Inf"):
        other.load_state_dict(state)


def test_memory_state_dict_without_extra_state_with_nonfinite_rows_is_refused():
    """Without its extra state the memory keeps its count, so its stored rows
    are checked too: a strict load fails only after torch has copied the
    buffers, which left NaN rows behind a failed load."""
    memory = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=8)
    memory(_x(1), LABELS)
    before = [t.clone() for t in memory.memory]
    state = {"memory_embeddings": torch.full((8, _x(1).shape[1]), NAN),
             "memory_labels": torch.zeros(8, dtype=torch.long)}
    for strict in (True, False):
        with pytest.raises(ValueError, match="^state_dict: .*NaN or Inf"):
            memory.load_state_dict(state, strict=strict)
        assert all(torch.equal(got, was) for got, was in zip(memory.memory, before))
    assert torch.isfinite(memory(_x(2), LABELS))
    # An empty memory uses none of the rows: the lenient load takes them.
    empty = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=8)
    empty.load_state_dict(state, strict=False)
    assert empty.num_stored == 0 and torch.isfinite(empty(_x(2), LABELS))


def test_memory_state_dict_rows_that_overflow_in_the_memory_dtype_are_refused():
    """Loading casts into the memory's dtype: a finite float32 row of 1e5 is
    Inf in a memory cast to float16. With ``assign=True`` the saved tensor
    itself is kept, and loads."""
    source = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=4, embedding_dim=3)
    source(torch.tensor([[1e5, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]),
           torch.tensor([0, 0, 1, 1]))
    target = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=4, embedding_dim=3).half()
    with pytest.raises(ValueError, match="^state_dict: .*NaN or Inf once cast to the memory's torch.float16"):
        target.load_state_dict(source.state_dict())
    assert target.num_stored == 0
    target.load_state_dict(source.state_dict(), assign=True)
    assert torch.equal(target.memory[0], source.memory[0])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_memory_state_dict_with_embeddings_not_floating_point_is_refused(dtype):
    """A memory of integers would store later batches truncated (0.5 as 0)."""
    memory = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=2)
    state = {"memory_embeddings": torch.ones(2, 2).to(dtype),
             "memory_labels": torch.tensor([0, 1]),
             "_extra_state": {"next": 0, "count": 2, "embedding_dim": 2}}
    with pytest.raises(ValueError, match=f"^state_dict: .*memory_embeddings has dtype {dtype}"):
        memory.load_state_dict(state)
    assert memory.memory_embeddings is None and memory.num_stored == 0


def test_memory_under_inference_then_autograd_functional():
    memory = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=16)
    with torch.inference_mode():
        memory(_x(1), LABELS)
    jac = torch.autograd.functional.jacobian(lambda e: memory(e, LABELS), _x(2))
    assert torch.isfinite(jac).all()


def test_memory_nan_labels_do_not_poison():
    """A stored NaN label is a class of its own: the next loss is the plain
    loop's over the batch and the stored rows."""
    memory = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=32)
    labels = LABELS.double()
    labels_nan = labels.clone()
    labels_nan[1] = NAN
    memory(_x(1), labels_nan)
    stored_x, stored_y = (t.clone() for t in memory.memory)
    x = _x(2)
    got = memory(x, labels)
    want = memory_reference_loss("hard", 0.2, "euclidean", False, x.double(), labels,
                                 torch.cat([x, stored_x]).double(), torch.cat([labels, stored_y]))
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


# =========================================================================== item 7: margin tensors

@pytest.mark.parametrize("mining, soft", [("all", False), ("hard", False), ("hard", True),
                                          ("semihard", False)])
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_margin_tensor_shapes_dtypes_and_non_leaf(mining, soft, shape):
    x = _x(14, n=8).double()
    raw = torch.full(shape, -0.5, dtype=torch.float32, requires_grad=True)
    margin = nn.functional.softplus(raw)  # non-leaf, float32 with float64 embeddings
    loss = function_loss(mining, LABELS, x, margin, "euclidean", soft=soft)
    loss.backward()
    assert raw.grad is not None and raw.grad.shape == raw.shape
    m = float(margin.detach().reshape(()))
    h = 1e-6
    fd = (_ref(mining, LABELS, x, m + h, "euclidean", soft=soft)
          - _ref(mining, LABELS, x, m - h, "euclidean", soft=soft)) / (2 * h)
    want = fd * torch.sigmoid(raw.detach().double()).reshape(())
    assert raw.grad.double().reshape(()).item() == pytest.approx(want.item(), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("mining", LOSSES)
def test_margin_requiring_grad_without_embedding_grad(mining):
    margin = torch.tensor(0.5, requires_grad=True)
    loss = function_loss(mining, LABELS, _x(15), margin, "euclidean")
    loss.backward()
    assert margin.grad is not None and margin.grad.item() != 0.0


@pytest.mark.parametrize("mining", LOSSES)
def test_margin_parameter_through_memory_and_distributed(mining):
    margin = nn.Parameter(torch.tensor(0.5))
    for wrap in (lambda m: CrossBatchMemory(m, memory_size=16),
                 lambda m: DistributedTripletLoss(m)):
        margin.grad = None
        criterion = wrap(make_module(mining, margin, "euclidean"))
        criterion(_x(16).requires_grad_(), LABELS).backward()
        assert margin.grad is not None and margin.grad.item() != 0.0
        assert any(p is margin for p in criterion.parameters())


@pytest.mark.parametrize("mining", LOSSES)
def test_margin_parameter_after_module_double(mining):
    module = make_module(mining, nn.Parameter(torch.tensor(0.5)), "euclidean").double()
    x = _x(17).double().requires_grad_()
    module(x, LABELS).backward()
    assert module.margin.grad is not None and module.margin.grad.dtype == torch.float64


# =========================================================================== item 8: NaN reaching gradients

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mining", LOSSES)
def test_nan_reaches_grad_in_other_dtypes(mining, dtype):
    x = _x(18).to(dtype)
    x[2, 1] = NAN
    x.requires_grad_()
    loss = function_loss(mining, LABELS, x, 0.2, "euclidean")
    assert torch.isnan(loss)
    loss.backward()
    assert not torch.isfinite(x.grad).all()


@pytest.mark.parametrize("mining", LOSSES)
def test_nan_reaches_grad_through_soft_module_memory_distributed(mining):
    soft = mining == "hard"
    for make in (lambda: make_module(mining, 0.0, "cosine", soft=soft),
                 lambda: CrossBatchMemory(make_module(mining, 0.2, "squared"), memory_size=16),
                 lambda: DistributedTripletLoss(make_module(mining, 0.2, "euclidean"))):
        x = _x(19)
        x[5, 0] = math.inf
        x.requires_grad_()
        loss = make()(x, LABELS)
        assert not torch.isfinite(loss)
        loss.backward()
        assert not torch.isfinite(x.grad).all()


@pytest.mark.parametrize("mining", LOSSES)
def test_nan_with_anchor_offset_reaches_grad(mining):
    x = _x(20)
    bank = _x(21)
    x[0, 0] = NAN
    x.requires_grad_()
    loss = function_loss(mining, LABELS, x, 0.2, "euclidean", ref_embeddings=torch.cat([bank, x]),
                         ref_labels=torch.cat([LABELS, LABELS]), anchor_offset=8)
    assert torch.isnan(loss)
    loss.backward()
    assert not torch.isfinite(x.grad).all()


@pytest.mark.parametrize("mining", LOSSES)
def test_nan_margin_gradient_is_non_finite(mining):
    margin = torch.tensor(0.3, requires_grad=True)
    x = _x(22)
    x[4, 4] = NAN
    loss = function_loss(mining, LABELS, x, margin, "euclidean")
    assert torch.isnan(loss)
    loss.backward()
    assert not torch.isfinite(margin.grad).all()


# =========================================================================== item 9: overflow and precision

@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("dtype, scales", [
    (torch.float32, [1e6, 1e12, 1e17, 1e19, 1e25, 1e37, 3e38]),
    (torch.bfloat16, [1e6, 1e17, 1e19, 1e30, 1e38]),
    (torch.float16, [3e2, 3e4, 6e4]),
])
def test_overflow_in_other_dtypes_and_references(mining, distance, dtype, scales):
    for scale in scales:
        x = (_x(23) * scale).to(dtype)
        ref = (_x(24) * scale).to(dtype)
        for kw in ({}, dict(ref_embeddings=ref, ref_labels=LABELS)):
            xd = x.double()
            kwd = {k: (v.double() if k == "ref_embeddings" else v) for k, v in kw.items()}
            want = function_loss(mining, LABELS, xd, 0.2, distance, **kwd).item()
            got = function_loss(mining, LABELS, x, 0.2, distance, **kw).float().item()
            rows = torch.cat([xd, kwd["ref_embeddings"]]) if kw else xd
            centre = kwd["ref_embeddings"] if kw else xd
            assert_overflow_is_nan_else_right(got, want, dtype, distance, rows, centre, 1e-2)


@pytest.mark.parametrize("mining", LOSSES)
def test_cosine_of_a_row_whose_norm_overflows(mining):
    # Finite entries whose norm does not fit in float32 (1.2e39 at 16 entries
    # of 3e38) would normalise to zero: NaN instead; 1e37 fits and is right.
    for value in (3e38, 1e37):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(26))
        x[5] = value
        assert torch.isfinite(x).all()
        want = function_loss(mining, LABELS, x.double(), 0.2, "cosine").item()
        got = function_loss(mining, LABELS, x, 0.2, "cosine").item()
        assert_overflow_is_nan_else_right(got, want, x.dtype, "cosine", x.double(), x.double(), 1e-4)
        if value > 1e38:
            assert math.isnan(got)


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("distance", ["euclidean", "squared"])
def test_one_huge_row_among_small_ones(mining, distance):
    # (A smaller outlier, 1e15 say, is the README's documented limit of Gram
    # distances: the other rows, far from the centre it pulls away, lose
    # float32's digits.)
    x = _x(25)
    x[7] = 3e19  # label 3: a lone class, only ever a negative
    want = function_loss(mining, LABELS, x.double(), 0.2, distance).item()
    got = function_loss(mining, LABELS, x, 0.2, distance).item()
    assert_overflow_is_nan_else_right(got, want, x.dtype, distance, x.double(), x.double(), 1e-3)


def _unit_within(seed, degrees, n=16, d=16):
    g = torch.Generator().manual_seed(seed)
    pole = torch.zeros(n, d, dtype=torch.float64)
    pole[:, 0] = 1
    tilt = torch.randn(n, d, generator=g, dtype=torch.float64)
    tilt[:, 0] = 0
    tilt = tilt / tilt.norm(dim=1, keepdim=True) * torch.rand(n, 1, generator=g).double() \
        * math.radians(degrees)
    return nn.functional.normalize(pole + tilt, dim=1).float().double()


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("degrees", [4.0, 0.5])
def test_cosine_float32_precision_near_parallel(mining, degrees):
    x = _unit_within(1, degrees)
    labels = torch.arange(16) % 4
    margin = 1e-4 if degrees < 1 else 1e-3
    want = function_loss(mining, labels, x, margin, "cosine").item()
    got = function_loss(mining, labels, x.float(), margin, "cosine").item()
    assert want > 0
    assert got == pytest.approx(want, rel=1e-3, abs=1e-12)


@pytest.mark.parametrize("mining", LOSSES)
def test_euclidean_underflow_tiny_scale(mining):
    # Right while the entries' squares are normal numbers, NaN below (the
    # squares of entries under 1.1e-19 lose float32's digits, then vanish).
    for scale, right in ((1e-18, True), (1e-22, False), (1e-30, False)):
        x = _x(26) * scale
        want = function_loss(mining, LABELS, x.double(), 0.0, "euclidean").item()
        got = function_loss(mining, LABELS, x, 0.0, "euclidean").item()
        assert want > 0
        if right:
            assert got == pytest.approx(want, rel=1e-3)
        else:
            assert math.isnan(got)


@pytest.mark.parametrize("distance", DISTANCES)
def test_metrics_half_and_bfloat16_overflow(distance):
    g = torch.Generator().manual_seed(10)
    x = torch.randn(40, 4, generator=g)
    labels = torch.arange(40) % 5
    want = metrics.recall_at_k(x.double(), labels, ks=(1, 5), distance=distance)
    for dtype, scale in ((torch.float16, 1e4), (torch.bfloat16, 1e37)):
        xs = (x * scale).to(dtype)
        want_s = metrics.recall_at_k(xs.double(), labels, ks=(1, 5), distance=distance)
        got = metrics.recall_at_k(xs, labels, ks=(1, 5), distance=distance)
        assert got == want_s, (dtype, got, want_s, want)


# =========================================================================== item 10: distributed

def test_distributed_without_group_checks_extra_references():
    criterion = DistributedTripletLoss(BatchHardTripletLoss(margin=0.2))
    x = _x(27).requires_grad_()
    extra = _x(28).double()
    try:
        got = criterion(x, LABELS, extra_embeddings=extra, extra_labels=LABELS.double())
    except (ValueError, TypeError) as err:
        assert "extra" in str(err)
        return
    want = _ref("hard", LABELS, x, 0.2, "euclidean", ref_embeddings=torch.cat([x, extra]).double(),
                ref_labels=torch.cat([LABELS, LABELS]), anchor_offset=0)
    assert got.item() == pytest.approx(want, rel=1e-5)


def _dist_worker(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        # (a) non-contiguous / expanded embeddings on the ranks, bool labels
        base = _x(rank, n=6, d=4)
        x = base.t().contiguous().t() if rank == 0 else base[:1].expand(6, 4) + 0 * base
        x = x.detach().requires_grad_()
        y = torch.tensor([True, False, True, False, True, False])
        for make in (lambda: BatchAllTripletLoss(margin=0.5), lambda: BatchHardTripletLoss(margin=0.5)):
            loss = DistributedTripletLoss(make())(x, y)
            loss.backward()
            assert torch.isfinite(loss)
        # (b) an empty rank in another dtype: either works or ValueError on both ranks
        e = _x(0, n=4, d=4) if rank == 0 else torch.empty(0, 4, dtype=torch.float64)
        yy = torch.tensor([0, 0, 1, 1]) if rank == 0 else torch.empty(0, dtype=torch.int64)
        try:
            DistributedTripletLoss(BatchHardTripletLoss(margin=0.5))(e, yy)
            ok = 1
        except ValueError:
            ok = 0
        flags = [None, None]
        dist.all_gather_object(flags, ok)
        assert flags[0] == flags[1], flags
        # (c) dtype mismatch under inference mode: ValueError, state kept
        z = _x(0, n=4, d=4).to(torch.float32 if rank == 0 else torch.float16)
        with torch.inference_mode():
            with pytest.raises(ValueError):
                DistributedTripletLoss(BatchHardTripletLoss(margin=0.5))(z, yy[:4] if rank == 0
                                                                        else torch.tensor([0, 0, 1, 1]))
            assert torch.is_inference_mode_enabled()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_other_layouts_and_mismatches(tmp_path):
    from test_distributed import _start
    _start(_dist_worker, (2, os.path.join(str(tmp_path), "init")), 2)


# =========================================================================== item 11: jit, compile, fx

class _Model(nn.Module):
    def __init__(self, call):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.call = call

    def forward(self, x, y):
        return self.call(self.linear(x), y)


@pytest.mark.parametrize("mining", LOSSES)
def test_trace_of_terms_and_cosine_refused(mining):
    model = _Model(lambda e, y: terms(mining, y, e, 0.2, distance="cosine")[0])
    x, y = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="not supported"):
            torch.jit.trace(model, (x, y))
    assert torch.is_grad_enabled()


def test_trace_module_with_check_trace_false_and_trace_module():
    model = _Model(BatchAllTripletLoss(margin=0.2))
    x, y = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="not supported"):
            torch.jit.trace(model, (x, y), check_trace=False)
        with pytest.raises(RuntimeError, match="not supported"):
            torch.jit.trace_module(model, {"forward": (x, y)})


@pytest.mark.parametrize("mining", LOSSES)
def test_fx_symbolic_trace_does_not_silently_capture(mining):
    """Tracing is refused, naming the argument that met a Proxy."""
    model = _Model(make_module(mining, 0.2, "euclidean"))
    _named_error(lambda: torch.fx.symbolic_trace(model), "labels")


@pytest.mark.parametrize("mining", LOSSES)
def test_torch_compile_eager_backend_matches_eager(mining):
    torch._dynamo.reset()
    module = make_module(mining, 0.3, "euclidean")
    model = _Model(module)
    compiled = torch.compile(model, backend="eager")
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    for seed in (30, 31):
        x = _x(seed, n=6, d=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = compiled(x, y)
        want = model(x, y)
        torch.testing.assert_close(got, want)
        (gg,) = torch.autograd.grad(got, model.linear.weight)
        (gw,) = torch.autograd.grad(model(x, y), model.linear.weight)
        torch.testing.assert_close(gg, gw)


@pytest.mark.parametrize("learnable", [False, True], ids=["float-margin", "parameter-margin"])
@pytest.mark.parametrize("mining", LOSSES)
def test_torch_compile_fullgraph_says_why_and_second_derivative_refused(mining, learnable):
    torch._dynamo.reset()
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    x = _x(32, n=6, d=3).double().requires_grad_()
    layer = torch.nn.Linear(3, 3).double()
    margin = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64)) if learnable else 0.3

    def loss(e):
        return function_loss(mining, y, torch.tanh(layer(e)), margin, "euclidean") * 2

    # Dynamo stops at the loss with the package's reason (a margin tensor's
    # value stopped it first, with dynamo's own message).
    with pytest.raises(Exception, match="online_triplet_loss: the triplet mining"):
        torch.compile(loss, backend="eager", fullgraph=True)(x)
    # Without fullgraph the graph breaks at the loss, and the model before it
    # is still compiled (torch 2.11 reported exporting while compiling, and
    # the refusal that raised skipped the whole frame).
    torch._dynamo.reset()
    graphs = []

    def backend(gm, inputs):
        graphs.append([n.target for n in gm.graph.nodes])
        return gm.forward

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = torch.compile(loss, backend=backend)(x)
    assert any(torch.tanh in targets for targets in graphs), graphs
    torch.testing.assert_close(value, loss(x))
    (g,) = torch.autograd.grad(value, x, create_graph=True)
    if mining == "hard":
        torch.testing.assert_close(
            torch.autograd.grad(g.sum(), x)[0],
            torch.autograd.grad(torch.autograd.grad(loss(x), x, create_graph=True)[0].sum(), x)[0])
    else:
        with pytest.raises(RuntimeError, match="second derivative"):
            torch.autograd.grad(g.sum(), x, allow_unused=True)


@pytest.mark.parametrize("wrapper", ["memory", "distributed"])
def test_torch_compile_fullgraph_of_wrappers_says_why(wrapper):
    # The single-process distributed loss compared float labels with integer
    # extra labels (a data-dependent check) before reaching the loss.
    torch._dynamo.reset()
    y = torch.tensor([0.0, 0, 1, 1, 2, 2], dtype=torch.float64)
    x = _x(33, n=6, d=3).double().requires_grad_()
    extra = (_x(34, n=3, d=3).double(), torch.tensor([0, 1, 2]))
    if wrapper == "memory":
        module = CrossBatchMemory(BatchHardTripletLoss(margin=0.3), memory_size=8)
        call = lambda e: module(e, y)  # noqa: E731
    else:
        module = DistributedTripletLoss(BatchHardTripletLoss(margin=0.3))
        call = lambda e: module(e, y, extra_embeddings=extra[0], extra_labels=extra[1])  # noqa: E731
    with pytest.raises(Exception, match="online_triplet_loss: the triplet mining"):
        torch.compile(call, backend="eager", fullgraph=True)(x)


def test_vmap_over_memory_and_metrics_refused_state_kept():
    memory = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=8)
    xs = torch.stack([_x(1), _x(2)])
    before = _state()
    with pytest.raises((RuntimeError, ValueError)):
        torch.func.vmap(lambda e: memory(e, LABELS))(xs)
    assert _state() == before
    assert memory.num_stored == 0
    with pytest.raises((RuntimeError, ValueError)):
        torch.func.vmap(lambda e: torch.tensor(metrics.recall_at_k(e, LABELS)[1]))(xs)
    assert _state() == before


# =========================================================================== item 12: settings

@pytest.mark.parametrize("kw, name", [
    (dict(margin=True), "margin"),
    (dict(margin=np.array(0.2)), None),  # 0-d array: accept it or name margin
    (dict(margin=torch.tensor([0.1, 0.2])), "margin"),
    (dict(margin=torch.tensor(NAN)), "margin"),
    (dict(margin=np.float64("inf")), "margin"),
    (dict(margin=10**400), "margin"),
    (dict(margin=complex(1, 0)), "margin"),
    (dict(margin="0.2"), "margin"),
    (dict(distance="COSINE"), "distance"),
])
@pytest.mark.parametrize("cls", [BatchAllTripletLoss, BatchHardTripletLoss, BatchSemiHardTripletLoss])
def test_module_settings(cls, kw, name):
    if name is None:
        try:
            module = cls(**kw)
        except (ValueError, TypeError) as err:
            assert "margin" in str(err)
            return
        assert module(_x(), LABELS).item() == pytest.approx(
            function_loss(module.mining, LABELS, _x(), 0.2, "euclidean").item())
        return
    _named_error(lambda: cls(**kw), name)


@pytest.mark.parametrize("attr, value", [("soft", "no"), ("margin", -1.0), ("distance", "cos"),
                                         ("margin", "x"), ("soft", 2), ("distance", None)])
def test_settings_changed_after_construction_are_checked(attr, value):
    module = BatchHardTripletLoss(margin=0.2)
    setattr(module, attr, value)
    _named_error(lambda: module(_x(), LABELS), attr)
    # ... also where a memory or the distributed wrapper (one process, with
    # extra references) calls the loss (distance=None meant euclidean there).
    _named_error(lambda: CrossBatchMemory(module, memory_size=16)(_x(), LABELS), attr)
    _named_error(lambda: DistributedTripletLoss(module)(_x(), LABELS, extra_embeddings=_x(),
                                                        extra_labels=LABELS), attr)


@pytest.mark.parametrize("kw, name", [
    (dict(memory_size=10.0), "memory_size"),
    (dict(memory_size=True), "memory_size"),
    (dict(memory_size=0), "memory_size"),
    (dict(memory_size=2**70), "memory_size"),
    (dict(memory_size=8, embedding_dim=True), "embedding_dim"),
    (dict(memory_size=8, embedding_dim=4.0), "embedding_dim"),
    (dict(memory_size=8, embedding_dim=2**63), "embedding_dim"),
])
def test_memory_settings(kw, name):
    _named_error(lambda: CrossBatchMemory(BatchHardTripletLoss(), **kw), name)


def test_memory_size_just_in_int64_does_not_allocate_or_crash(capfd):
    # embedding_dim given with a huge memory_size: allocation fails; must be an error, not a crash
    with pytest.raises((ValueError, RuntimeError, MemoryError)):
        CrossBatchMemory(BatchHardTripletLoss(), memory_size=2**62, embedding_dim=2**20)
    _no_panic(capfd)


@pytest.mark.parametrize("kw, name", [
    (dict(p=True, k=2), "p"), (dict(p=2, k=2.0), "k"), (dict(p=2, k=2, seed="x"), "seed"),
    (dict(p=2, k=2, rank=2, world_size=2), "rank"), (dict(p=2, k=2, world_size=0), "world_size"),
    (dict(p=2, k=2, rank=True), "rank"), (dict(p=5, k=2), "p"), (dict(p=2, k=2**64), "k"),
])
def test_pksampler_settings(kw, name):
    _named_error(lambda: PKSampler([0, 0, 1, 1, 2, 2], **kw), name)


@pytest.mark.parametrize("kw, name", [
    (dict(ks=torch.tensor([1, 5])), None),  # a tensor of ks: accept by value or name ks
    (dict(ks=[1.0]), "ks"), (dict(ks=[True]), "ks"), (dict(ks="1"), "ks"),
    (dict(ks=[1], chunk_size=True), "chunk_size"), (dict(ks=[1], chunk_size=0.5), "chunk_size"),
    (dict(ks=[1], distance="l2"), "distance"),
])
def test_metric_settings(kw, name):
    x, y = _x(n=12, d=3), torch.arange(12) % 3
    if name is None:
        try:
            got = metrics.recall_at_k(x, y, **kw)
        except (ValueError, TypeError) as err:
            assert "ks" in str(err)
            return
        assert got == metrics.recall_at_k(x, y, ks=(1, 5))
        return
    _named_error(lambda: metrics.recall_at_k(x, y, **kw), name)


@pytest.mark.parametrize("kw, name", [
    (dict(squared="yes"), "squared"), (dict(squared=2), "squared"),
    (dict(squared=None), "squared"), (dict(distance=b"cosine"), "distance"),
])
def test_function_settings(kw, name):
    _named_error(lambda: batch_all_triplet_loss(LABELS, _x(), 0.2, **kw), name)


def _demo(args, cwd):
    env = dict(os.environ, PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, "-m", "online_triplet_loss.demo", *args],
                          capture_output=True, text=True, timeout=60, cwd=cwd, env=env)


def test_demo_out_is_a_file_fails_before_training(tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    out = _demo(["--epochs", "1", "--out", str(target), "--no-progress"], tmp_path)
    assert out.returncode != 0
    assert "--out" in out.stderr, out.stderr[-1000:]
    assert "held-out" not in out.stdout and "Traceback" not in out.stderr, out.stdout + out.stderr


@pytest.mark.parametrize("args, word", [
    (["--epochs", "99999999999999999999999"], "--epochs"),
    (["--dim", "99999999999999999999999"], "--dim"),
    (["--threads", "100000000000"], "--threads"),
    (["--margin", "nan"], "--margin"), (["--margin", "inf"], "--margin"),
    (["--lr", "nan"], "--lr"), (["--seed", "-1"], "--seed"),
])
def test_demo_rejects_absurd_values_without_traceback(tmp_path, args, word):
    out = _demo([*args, "--out", str(tmp_path / "o"), "--no-progress"], tmp_path)
    assert out.returncode != 0, out.stdout[-500:]
    assert word in out.stderr and "Traceback" not in out.stderr, out.stderr[-1500:]


# =========================================================================== item 13: anchor_offset

@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("offset_kind", [np.int64, np.uint8, int])
def test_anchor_offset_numpy_and_last_valid_position(mining, offset_kind):
    x, bank = _x(32), _x(33, n=5)
    ref, ref_labels = torch.cat([bank, x]), torch.cat([LABELS[:5], LABELS])
    want = _ref(mining, LABELS, x, 0.2, "euclidean", ref_embeddings=ref, ref_labels=ref_labels,
                anchor_offset=5)
    got = function_loss(mining, LABELS, x, 0.2, "euclidean", ref_embeddings=ref,
                        ref_labels=ref_labels, anchor_offset=offset_kind(5))
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mining", LOSSES)
def test_anchor_offset_via_module_forward(mining):
    x, bank = _x(34), _x(35)
    ref, ref_labels = torch.cat([x, bank]), torch.cat([LABELS, LABELS.flip(0)])
    want = _ref(mining, LABELS, x, 0.2, "cosine", ref_embeddings=ref, ref_labels=ref_labels,
                anchor_offset=0)
    got = make_module(mining, 0.2, "cosine")(x, LABELS, ref_embeddings=ref, ref_labels=ref_labels,
                                             anchor_offset=0)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("bad", [torch.tensor(0), 0.0, np.float64(0), "0", [0]])
def test_anchor_offset_non_int_types(mining, bad):
    x = _x(36)
    _named_error(lambda: function_loss(mining, LABELS, x, 0.2, "euclidean", ref_embeddings=x,
                                       ref_labels=LABELS, anchor_offset=bad), "anchor_offset")


@pytest.mark.parametrize("mining", LOSSES)
def test_anchor_offset_with_empty_batch(mining):
    x = torch.empty(0, 5, requires_grad=True)
    ref = _x(37)
    loss = function_loss(mining, torch.empty(0, dtype=torch.long), x, 0.2, "euclidean",
                         ref_embeddings=ref, ref_labels=LABELS, anchor_offset=8)
    assert loss.item() == 0.0
    loss.backward()


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("offset", [1, 2**31, 2**32 + 1, 2**62])
def test_anchor_offset_rust_binding_out_of_range(mining, offset, capfd):
    x = _x(38)
    with pytest.raises(ValueError, match="anchor_offset"):
        _core.triplet_terms(mining, LABELS, x, 0.2, "euclidean", False, x, LABELS, offset)
    _no_panic(capfd)


# =========================================================================== item 14: the binding's own arguments

@pytest.mark.parametrize("name, call", [
    ("count", lambda: _core.mean_and_fraction(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3),
                                              torch.zeros(2, 2))),
    ("sum", lambda: _core.mean_and_fraction(torch.tensor(1.0).to("meta"), torch.tensor(2),
                                            torch.tensor(3), torch.zeros(2, 2))),
    ("count", lambda: _core.mean_and_fraction(torch.tensor(1.0), torch.tensor(2).to_sparse(),
                                              torch.tensor(3), torch.zeros(2, 2))),
    ("sum", lambda: _core.mean_and_fraction(torch.tensor(1.0 + 1j), torch.tensor(2), torch.tensor(3),
                                            torch.zeros(2, 2))),
    ("like", lambda: _core.mean_and_fraction(torch.tensor(1.0), torch.tensor(2), torch.tensor(3),
                                             torch.zeros(2, 2, dtype=torch.int64))),
    ("chunk_size", lambda: _core.triplet_terms("hard", LABELS, _x(), 0.2, "euclidean", False, chunk_size=0)),
    ("chunk_size", lambda: _core.triplet_terms("hard", LABELS, _x(), 0.2, "euclidean", False, chunk_size=-5)),
    ("mining", lambda: _core.triplet_terms("bogus", LABELS, _x(), 0.2, "euclidean", False)),
    ("distance", lambda: _core.triplet_terms("hard", LABELS, _x(), 0.2, "l1", False)),
    ("margin", lambda: _core.triplet_terms("hard", LABELS, _x(), -0.2, "euclidean", False)),
    ("margin", lambda: _core.triplet_terms("hard", LABELS, _x(), NAN, "euclidean", False)),
    ("margin", lambda: _core.triplet_terms("hard", LABELS, _x(), 0.2, "euclidean", False,
                                           margin_tensor=torch.tensor([0.2, 0.3]))),
    ("margin", lambda: _core.triplet_terms("hard", LABELS, _x(), 0.2, "euclidean", False,
                                           margin_tensor=torch.tensor(0.2).to("meta"))),
    ("margin", lambda: _core.triplet_terms("hard", LABELS, _x(), 0.2, "euclidean", False,
                                           margin_tensor=torch.tensor(2))),
    ("ref_labels", lambda: _core.triplet_terms("hard", LABELS, _x(), 0.2, "euclidean", False, _x(), None)),
    ("ks", lambda: _core.retrieval_scores(_x(), LABELS, [], full=None, distance="euclidean")),
    ("ks", lambda: _core.retrieval_scores(_x(), LABELS, [0], full=None, distance="euclidean")),
    ("ks", lambda: _core.retrieval_scores(_x(), LABELS, [-1], full=True, distance="euclidean")),
    ("chunk_size", lambda: _core.retrieval_scores(_x(), LABELS, [1], full=None, distance="euclidean",
                                                  chunk_size=0)),
    ("chunk_size", lambda: _core.retrieval_scores(_x(), LABELS, [1], full=None, distance="euclidean",
                                                  chunk_size=-1)),
    ("chunk_size", lambda: _core.retrieval_scores(_x(), LABELS, [], full=False, distance="euclidean",
                                                  chunk_size=-3)),
    ("ref_labels", lambda: _core.retrieval_scores(_x(), LABELS, [1], full=None, distance="euclidean",
                                                  ref_embeddings=_x())),
    ("cameras", lambda: _core.retrieval_scores(_x(), LABELS, [1], full=None, distance="euclidean",
                                               cameras=LABELS[:3])),
    ("ref_cameras", lambda: _core.retrieval_scores(_x(), LABELS, [1], full=None, distance="euclidean",
                                                   cameras=LABELS, ref_embeddings=_x(), ref_labels=LABELS)),
])
def test_binding_rejects_bad_arguments_without_panic(name, call, capfd):
    before = _state()
    with torch.no_grad():
        _named_error(call, name)
    assert _state() == before
    _no_panic(capfd)


def test_margin_tensor_mismatch_with_margin_value_binding():
    """Debatable (private binding): value from ``margin``, gradient from
    ``margin_tensor``; a Rust/binding caller can make them disagree."""
    # margin (the float) and margin_tensor disagreeing: the binding must not
    # silently use one for the value and the other for the gradient.
    x = _x(39).requires_grad_()
    m = torch.tensor(0.9, requires_grad=True)
    s, c, _ = _core.triplet_terms("hard", LABELS, x, 0.2, "euclidean", False, margin_tensor=m)
    want = reference_terms("hard", LABELS, x.detach().double(), 0.9, "euclidean")
    try:
        assert float(s) == pytest.approx(float(want.sum), rel=1e-5)
    except AssertionError:
        pytest.fail(f"binding used margin=0.2 for the value (sum {float(s)}) but margin_tensor 0.9 "
                    f"elsewhere (reference sum {float(want.sum)})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", LOSSES)
def test_the_losses_leave_their_inputs_alone(mining, distance, dtype):
    """No loss writes to a tensor it is given: the embeddings, the reference
    parts, the labels and a margin tensor keep their values and their
    version counters (which every in-place operation on them, or on a view
    of them, bumps), with and without references, far from the origin and
    near it, native and portable, also for float64 inputs, which a cast to
    the loss's float64 leaves as the caller's own tensors. Rows span two
    of the CPU's row blocks."""
    g = torch.Generator().manual_seed(5)
    for offset in (0.0, 1e4):
        x = (torch.randn(40, 128, generator=g, dtype=torch.float64) + offset).to(dtype)
        bank = (torch.randn(3000, 128, generator=g, dtype=torch.float64) + offset).to(dtype)
        bank[7] = x[3]  # an identical row, for the ties
        labels = torch.randint(0, 6, (40,), generator=g)
        bank_labels = torch.randint(0, 6, (3000,), generator=g)
        margin = torch.tensor(0.3, dtype=dtype, requires_grad=True)
        given = (x, bank, labels, bank_labels, margin)
        copies = [t.detach().clone() for t in given]
        versions = [t._version for t in given]
        xg = x.requires_grad_(True)
        calls = [
            lambda: function_loss(mining, labels, xg, margin, distance),
            lambda: function_loss(mining, labels, xg, margin, distance, ref_embeddings=(xg, bank),
                                  ref_labels=torch.cat([labels, bank_labels]), anchor_offset=0),
            lambda: function_loss(mining, labels, xg, margin, distance, ref_embeddings=bank,
                                  ref_labels=bank_labels),
            lambda: _core.triplet_terms(mining, labels, xg, 0.3, distance, False, bank,
                                        bank_labels, None, None, portable=True)[0],
        ]
        for call in calls:
            call().backward()
        for name, t, copy, version in zip(("embeddings", "bank", "labels", "bank labels", "margin"),
                                          given, copies, versions, strict=True):
            assert t._version == version, f"{name}: written to (offset {offset})"
            assert torch.equal(t.detach(), copy), f"{name}: changed (offset {offset})"
