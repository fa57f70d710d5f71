"""Autograd beyond the first derivative, learnable margins and reference sets
that contain the anchors (issue 11, items 3, 7 and 13).

- batch-all and semi-hard are differentiable once: every way of asking for a
  second derivative raises, first derivatives are those of the reference,
  and ``retain_graph`` works as for any loss;
- batch-hard is twice differentiable: its Hessian is the float64 reference's;
- a margin tensor that requires grad gets the reference's gradient;
- ``anchor_offset`` makes each anchor's own row no positive, as the reference
  and CrossBatchMemory say.
"""

from __future__ import annotations

import random

import pytest
import torch

import reference
from conftest import make_batch, make_labels, make_reference_set
from helpers import DISTANCES, LOSSES, function_loss, grad_of, leaf, make_module
from online_triplet_loss import CrossBatchMemory
from online_triplet_loss.distributed import DistributedTripletLoss

FIRST_ORDER = ("all", "semihard")
SEEDS = range(40, 46)
TIGHT = dict(rtol=1e-9, atol=1e-11)


def _batch(seed, size=(6, 14)):
    b = make_batch(seed, min_size=size[0], max_size=size[1], dim=3)
    return b.labels, b.embeddings


def _ref_loss(mining, labels, x, margin, distance, soft=False, **kw):
    return reference.reference_terms(mining, labels, x, margin, distance, soft=soft, **kw).loss


def _second_derivative_requests(loss_of):
    """The ways a caller asks for a second derivative, each a callable of a
    leaf ``x``."""

    def double_backward(x):
        (g,) = torch.autograd.grad(loss_of(x), x, create_graph=True)
        torch.autograd.grad((g * g).sum(), x)

    def gradient_penalty(x):  # WGAN-GP style: penalty.backward()
        (g,) = torch.autograd.grad(loss_of(x), x, create_graph=True)
        (loss_of(x) + g.norm()).backward()

    def hessian(x):
        torch.autograd.functional.hessian(loss_of, x.detach())

    def hessian_vector_product(x):
        torch.autograd.functional.hvp(loss_of, x.detach(), torch.ones_like(x))

    return [double_backward, gradient_penalty, hessian, hessian_vector_product]


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad-outside"])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", FIRST_ORDER)
def test_second_derivatives_raise(mining, distance, grad_mode):
    for seed in SEEDS:
        labels, x = _batch(seed)
        x = leaf(x)
        for request in _second_derivative_requests(
            lambda e: function_loss(mining, labels, e, 0.5, distance)
        ):
            with torch.set_grad_enabled(grad_mode):
                with torch.enable_grad(), pytest.raises(RuntimeError, match="second derivatives"):
                    request(x)
                assert torch.is_grad_enabled() == grad_mode


@pytest.mark.parametrize("mining", FIRST_ORDER)
def test_batched_gradients_raise_and_batch_hard_gives_them(mining):
    labels, x = _batch(SEEDS[0])
    loss = lambda e: function_loss(mining, labels, e, 0.5, "euclidean").reshape(1)  # noqa: E731
    with pytest.raises(RuntimeError, match="batched gradients"):
        torch.autograd.functional.jacobian(loss, x, vectorize=True)
    with pytest.raises(RuntimeError, match="batched gradients"):
        e = leaf(x)
        torch.autograd.grad(loss(e), e, torch.eye(1), is_grads_batched=True)
    assert torch.is_grad_enabled()
    # Batch-hard's graph is plain autograd, and vectorises.
    hard = lambda e: function_loss("hard", labels, e, 0.5, "euclidean").reshape(1)  # noqa: E731
    torch.testing.assert_close(torch.autograd.functional.jacobian(hard, x, vectorize=True),
                               torch.autograd.functional.jacobian(hard, x))


@pytest.mark.parametrize("mining", FIRST_ORDER)
def test_second_derivatives_raise_with_references_modules_memory_and_margin(mining):
    """Through a reference set, the Modules, CrossBatchMemory and the
    single-process DistributedTripletLoss: the same refusal, never zeros."""
    labels, x, ref_labels, ref_x, _ = make_reference_set(3, 8, 3, with_offset=False)
    ref_labels = torch.cat([labels, ref_labels])
    module = make_module(mining, 0.5, "euclidean")

    def through_ref(e):
        return function_loss(mining, labels, e, 0.5, "euclidean",
                             ref_embeddings=torch.cat([e, ref_x]), ref_labels=ref_labels)

    def through_memory(e):
        memory = CrossBatchMemory(make_module(mining, 0.5, "euclidean"), memory_size=16)
        memory.enqueue(ref_x, ref_labels[8:])
        return memory(e, labels)

    for loss_of in (through_ref, lambda e: module(e, labels), through_memory,
                    lambda e: DistributedTripletLoss(module)(e, labels)):
        assert loss_of(x) > 0
        for request in _second_derivative_requests(loss_of):
            with pytest.raises(RuntimeError, match="second derivatives"):
                request(leaf(x))
    # The reference embeddings alone require grad.
    ref = leaf(ref_x)
    (g,) = torch.autograd.grad(
        function_loss(mining, labels, x, 0.5, "euclidean", ref_embeddings=ref,
                      ref_labels=ref_labels[8:]), ref, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(g.sum(), ref)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", FIRST_ORDER)
def test_first_derivatives_through_the_wrapper(mining, distance):
    """Gradients into embeddings and references, with and without
    create_graph, equal the reference's."""
    for seed in SEEDS:
        labels, x, ref_labels, ref_x, k = make_reference_set(seed, 7, 3, with_offset=True)
        x, ref_x = leaf(x), leaf(ref_x)
        kw = dict(ref_embeddings=ref_x, ref_labels=ref_labels, anchor_offset=k)
        expected = _ref_loss(mining, labels, x, 0.3, distance, **kw)
        want = grad_of(expected, x, ref_x)
        for create_graph in (False, True):
            got = function_loss(mining, labels, x, 0.3, distance, **kw)
            torch.testing.assert_close(got, expected, **TIGHT)
            grads = torch.autograd.grad(got, (x, ref_x), create_graph=create_graph)
            for g, w in zip(grads, want):
                torch.testing.assert_close(g, w, **TIGHT)


@pytest.mark.parametrize("mining", LOSSES)
def test_retain_graph_and_freed_graph(mining):
    labels, x = _batch(7)
    x = leaf(x)
    loss = function_loss(mining, labels, x, 0.5, "euclidean")
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    loss.backward()
    assert torch.equal(x.grad, first)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("mining", FIRST_ORDER)
def test_no_graph_without_grad(mining):
    """Under no_grad or inference_mode, or for inputs that need no gradient,
    the result has no graph at all."""
    labels, x = _batch(8)
    plain = function_loss(mining, labels, x, 0.5, "euclidean")
    assert plain.grad_fn is None
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            got = function_loss(mining, labels, leaf(x), 0.5, "euclidean")
        assert got.grad_fn is None and torch.equal(got, plain)


def _hard_by_pairs(labels, x, margin, distance, soft):
    """The reference's batch-hard, its selection taken from the reference and
    each selected distance recomputed from its two rows alone: the
    reference's full matrix holds the zero self-distances, where the
    Euclidean norm has no second derivative (autograd gives NaN)."""
    problem = reference._Problem(labels, x, distance, None, None, None)
    terms = []
    for a in range(problem.n):
        pos, neg = problem.positives(a), problem.negatives(a)
        if not pos or not neg:
            continue
        row = problem.dv[a]
        p = pos[reference._argmax_lowest([row[j] for j in pos])]
        n = neg[reference._argmin_lowest([row[j] for j in neg])]
        z = (reference.pair_distance(x[a], x[p], distance)
             - reference.pair_distance(x[a], x[n], distance) + margin)
        # log(1 + e^z) exactly (F.softplus returns z above 20).
        terms.append(torch.logaddexp(z, torch.zeros_like(z)) if soft else torch.relu(z))
    return torch.stack(terms).mean() if terms else x.sum() * 0.0


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("distance", DISTANCES)
def test_batch_hard_hessian_matches_reference(distance, soft):
    for seed in SEEDS:
        labels, x = _batch(seed, size=(4, 9))
        for margin in (0.2, 2.0):
            torch.testing.assert_close(_hard_by_pairs(labels, x, margin, distance, soft),
                                       _ref_loss("hard", labels, x, margin, distance, soft=soft),
                                       **TIGHT)
            got = torch.autograd.functional.hessian(
                lambda e: function_loss("hard", labels, e, margin, distance, soft=soft), x)
            expected = torch.autograd.functional.hessian(
                lambda e: _hard_by_pairs(labels, e, margin, distance, soft), x)
            torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    assert expected.abs().sum() > 0


def _hard_with_zero_subgradients(labels, x, margin):
    """Batch-hard whose Euclidean distance has first and second derivatives 0
    at distance 0 (sqrt taken on 1 there), from the float64 brute force."""
    diff = x[:, None] - x[None]
    sq = (diff * diff).sum(-1)
    apart = sq > 0
    d = torch.where(apart, torch.where(apart, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
    terms = []
    for a in range(len(labels)):
        pos = [j for j in range(len(labels)) if j != a and labels[j] == labels[a]]
        neg = [j for j in range(len(labels)) if labels[j] != labels[a]]
        p = max(pos, key=lambda j: (d[a, j].item(), -j))
        n = min(neg, key=lambda j: (d[a, j].item(), j))
        terms.append(torch.relu(d[a, p] - d[a, n] + margin))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batch_hard_second_derivatives_at_zero_distance(dtype):
    """Two identical embeddings of different labels (d_an = 0 for both): a
    Hessian-vector product with a large vector and a gradient penalty are
    finite, and equal the brute force's (the subgradient 0 at 0)."""
    x0 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.5, 0.5]],
                      dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 1])
    v = torch.tensor([[5.0, 0.0], [-5.0, 3.0], [0.0, 0.0], [1.0, 0.0], [0.0, -2.0]]) * 1e3
    results = []
    for f in (lambda e: function_loss("hard", labels, e, 1.0, "euclidean"),
              lambda e: _hard_with_zero_subgradients(labels, e, 1.0)):
        x = x0.to(dtype).requires_grad_()
        loss = f(x)
        g, = torch.autograd.grad(loss, x, create_graph=True)
        hv, = torch.autograd.grad((g * v.to(dtype)).sum(), x, retain_graph=True)
        penalty, = torch.autograd.grad(loss + 10.0 * g.pow(2).sum(), x)
        results.append((hv, penalty))
    for got, want in zip(*results):
        assert torch.isfinite(got).all(), got
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_float64_margin_beyond_the_dtype_is_refused_as_a_number_is(dtype):
    """A float64 margin tensor of 1e39 is finite and >= 0, but no float32 (or
    narrower) loss holds it: refused, as the number 1e39 is, where both once
    gave an infinite loss; grad mode is left as it was."""
    labels, x = _batch(3)
    x = x.to(dtype)
    margin = torch.tensor(1e39, dtype=torch.float64, requires_grad=True)
    for m in (margin, 1e39):
        with pytest.raises(ValueError, match="margin: must be at most"):
            function_loss("hard", labels, leaf(x), m, "euclidean")
        assert torch.is_grad_enabled()
    assert margin.grad is None


@pytest.mark.parametrize("distance", DISTANCES)
def test_batch_hard_gradgradcheck(distance):
    for seed in SEEDS[:3]:
        labels, x = _batch(seed, size=(4, 7))
        ref_labels = torch.cat([labels, make_labels(random.Random(seed), 5)])
        ref_x = torch.cat([x, torch.randn(5, 3, dtype=torch.float64,
                                          generator=torch.Generator().manual_seed(seed))])
        torch.autograd.gradgradcheck(
            lambda e: function_loss("hard", labels, e, 0.7, distance, soft=True), (leaf(x),))
        torch.autograd.gradgradcheck(
            lambda e, r: function_loss("hard", labels, e, 0.7, distance, soft=True,
                                       ref_embeddings=r, ref_labels=ref_labels, anchor_offset=0),
            (leaf(x), leaf(ref_x)))


# ------------------------------------------------------------ learnable margin
# These need the core's `margin_tensor=` argument (the binding's side of item 7).


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining, soft", [("all", False), ("hard", False), ("hard", True),
                                          ("semihard", False)])
def test_margin_tensor_gets_the_reference_gradient(mining, soft, distance):
    for seed in SEEDS:
        labels, x = _batch(seed, size=(5, 10))
        for value, shape in ((0.3, ()), (1.5, (1,))):
            margin = torch.full(shape, value, dtype=torch.float64, requires_grad=True)
            got = function_loss(mining, labels, leaf(x), margin, distance, soft=soft)
            ref_margin = torch.full(shape, value, dtype=torch.float64, requires_grad=True)
            expected = _ref_loss(mining, labels, x, ref_margin.reshape(()), distance, soft=soft)
            torch.testing.assert_close(got, expected.reshape(()), **TIGHT)
            (g,) = torch.autograd.grad(got, margin)
            # A batch without a valid term gives a reference that does not
            # depend on the margin at all: its derivative is 0.
            (w,) = grad_of(expected, ref_margin) if expected.requires_grad else (
                torch.zeros_like(ref_margin),)
            assert g.shape == margin.shape
            torch.testing.assert_close(g, w, **TIGHT)


@pytest.mark.parametrize("mining", LOSSES)
def test_margin_parameter_of_a_module_is_learned(mining):
    labels, x = _batch(11, size=(8, 12))
    margin = torch.nn.Parameter(torch.tensor(0.4, dtype=torch.float64))
    module = make_module(mining, margin, "euclidean")
    assert any(p is margin for p in module.parameters())
    module(leaf(x), labels).backward()
    ref_margin = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    (expected,) = grad_of(_ref_loss(mining, labels, x, ref_margin, "euclidean"), ref_margin)
    assert expected != 0
    torch.testing.assert_close(margin.grad, expected, **TIGHT)


@pytest.mark.parametrize("mining", LOSSES)
def test_a_frozen_margin_parameter_stays_the_modules_and_learns_once_unfrozen(mining):
    """A margin Parameter frozen at first (a warm-up, say) stays the module's
    parameter (in ``state_dict``), read by value while frozen, and gets the
    reference gradient once unfrozen."""
    labels, x = _batch(11, size=(8, 12))
    margin = torch.nn.Parameter(torch.tensor(0.4, dtype=torch.float64), requires_grad=False)
    module = make_module(mining, margin, "euclidean")
    assert module.margin is margin and "margin" in module.state_dict()
    assert torch.equal(module(leaf(x), labels), make_module(mining, 0.4, "euclidean")(leaf(x), labels))
    module(leaf(x), labels).backward()
    assert margin.grad is None
    margin.requires_grad_(True)
    module(leaf(x), labels).backward()
    ref_margin = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    (expected,) = grad_of(_ref_loss(mining, labels, x, ref_margin, "euclidean"), ref_margin)
    assert expected != 0
    torch.testing.assert_close(margin.grad, expected, **TIGHT)


@pytest.mark.parametrize("mining", LOSSES)
def test_margin_tensor_without_grad_needs_no_graph(mining):
    """A margin tensor that needs no gradient, or any margin under no_grad,
    is read by value."""
    labels, x = _batch(12)
    expected = function_loss(mining, labels, x, 0.25, "euclidean")
    for margin in (torch.tensor(0.25), torch.tensor([0.25], dtype=torch.float64)):
        assert torch.equal(function_loss(mining, labels, x, margin, "euclidean"), expected)
    with torch.no_grad():
        margin = torch.tensor(0.25, requires_grad=True)
        assert torch.equal(function_loss(mining, labels, x, margin, "euclidean"), expected)
    assert margin.grad is None


@pytest.mark.parametrize("mining", LOSSES)
def test_margin_tensor_off_the_cpu_is_refused(mining):
    labels, x = _batch(13)
    margin = torch.tensor(0.2, device="meta", requires_grad=True)
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode):
            with pytest.raises(ValueError, match="margin: must be a number or a one-element CPU tensor"):
                function_loss(mining, labels, leaf(x), margin, "euclidean")
            assert torch.is_grad_enabled() == grad_mode


@pytest.mark.parametrize("mining", LOSSES)
def test_a_learned_margin_follows_casts_and_says_how_to_stay_at_zero(mining):
    """A Module's learned margin is cast with it and stays the same parameter
    on the CPU (what the optimiser holds); taken below 0 by the optimiser (the
    loss never decreases as the margin grows), it is refused with the remedy."""
    labels, x = _batch(13)
    margin = torch.nn.Parameter(torch.tensor(0.05))
    loss_fn = make_module(mining, margin, "euclidean")
    optimiser = torch.optim.SGD([margin], lr=10.0)
    loss_fn.double()
    assert loss_fn.margin is margin and margin.dtype == torch.float64 and margin.device.type == "cpu"
    loss_fn(leaf(x), labels).backward()
    assert margin.grad >= 0
    optimiser.step()
    assert margin < 0
    with pytest.raises(ValueError, match=r"(?s)margin: must be finite and >= 0, .*margin\.data\.clamp_\(min=0\)"):
        loss_fn(leaf(x), labels)
    margin.data.clamp_(min=0)
    loss_fn(leaf(x), labels).backward()


# ------------------------------------------------------------ anchor_offset


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining, soft", [("all", False), ("hard", False), ("hard", True),
                                          ("semihard", False)])
def test_anchor_offset_matches_reference(mining, soft, distance):
    for seed in range(60, 75):
        labels, x, ref_labels, ref_x, k = make_reference_set(seed, 6, 3, with_offset=True)
        x, ref_x = leaf(x), leaf(ref_x)
        kw = dict(ref_embeddings=ref_x, ref_labels=ref_labels, anchor_offset=k)
        expected = _ref_loss(mining, labels, x, 0.4, distance, soft=soft, **kw)
        got = function_loss(mining, labels, x, 0.4, distance, soft=soft, **kw)
        torch.testing.assert_close(got, expected, **TIGHT)
        module = make_module(mining, 0.4, distance, soft)
        torch.testing.assert_close(module(x, labels, **kw), got, rtol=0, atol=0)
        for g, w in zip(grad_of(got, x, ref_x), grad_of(expected, x, ref_x)):
            torch.testing.assert_close(g, w, **TIGHT)


@pytest.mark.parametrize("mining", LOSSES)
def test_anchor_offset_agrees_with_cross_batch_memory(mining):
    """The issue's example: references = cat([batch, bank]) with
    anchor_offset=0 is CrossBatchMemory's loss; without it each anchor is its
    own positive and the value differs (here through class 5's anchor)."""
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor([0, 0, 1, 1, 2, 5])  # class 5 has no other sample
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    bank, bank_labels = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.tensor(
        [0, 1, 2, 3, 4, 0, 1, 2, 3])
    memory = CrossBatchMemory(make_module(mining, 3.0, "euclidean"), memory_size=32)
    memory.enqueue(bank, bank_labels)
    expected = memory(x, labels)
    kw = dict(ref_embeddings=torch.cat([x, bank]), ref_labels=torch.cat([labels, bank_labels]))
    got = function_loss(mining, labels, x, 3.0, "euclidean", anchor_offset=0, **kw)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(function_loss(mining, labels, x, 3.0, "euclidean", **kw), expected)


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("bad", [True, 1.0, "0", -1, 8, 2**70, -(2**70)])
def test_anchor_offset_errors(mining, bad):
    labels, x = torch.tensor([0, 0, 1]), torch.randn(3, 2)
    ref = dict(ref_embeddings=torch.randn(10, 2), ref_labels=torch.arange(10))
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode):
            with pytest.raises(ValueError, match="anchor_offset"):
                function_loss(mining, labels, x, 0.2, "euclidean", anchor_offset=bad, **ref)
            with pytest.raises(ValueError, match="anchor_offset"):
                make_module(mining, 0.2, "euclidean")(x, labels, anchor_offset=bad, **ref)
            if bad not in (0, None) and not isinstance(bad, (bool, float, str)):
                with pytest.raises(ValueError, match="anchor_offset"):
                    function_loss(mining, labels, x, 0.2, "euclidean", anchor_offset=bad)
            assert torch.is_grad_enabled() == grad_mode
    # 0 without references is the batch itself.
    assert torch.equal(function_loss(mining, labels, x, 0.2, "euclidean", anchor_offset=0),
                       function_loss(mining, labels, x, 0.2, "euclidean"))


@pytest.mark.parametrize("mining", ["all", "hard", "semihard"])
def test_non_reentrant_checkpoint_and_saved_tensor_hooks(mining):
    # Non-reentrant checkpoint recomputes the forward in backward and stops it
    # with an exception from a saved-tensor hook, which runs inside the native
    # code: the loss must let it through as it was raised.
    from torch.utils.checkpoint import checkpoint

    labels, x = _batch(SEEDS[1])
    x = leaf(x)
    loss = lambda e: function_loss(mining, labels, e, 0.5, "euclidean")  # noqa: E731
    (want,) = torch.autograd.grad(loss(x), x)
    (got,) = torch.autograd.grad(checkpoint(loss, x, use_reentrant=False), x)
    torch.testing.assert_close(got, want, **TIGHT)
    with torch.autograd.graph.save_on_cpu():
        value = loss(x)
    torch.testing.assert_close(torch.autograd.grad(value, x)[0], want, **TIGHT)

    class Refused(Exception):
        pass

    def pack(t):
        raise Refused("no saving")

    with pytest.raises(Refused, match="no saving"):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss(x)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("mining", ["all", "hard", "semihard"])
@pytest.mark.parametrize("selective", [False, True], ids=["checkpoint", "selective"])
def test_checkpoint_recomputes_once(mining, selective):
    # Selective activation checkpointing serves each saved result once: a
    # second recomputation of the region (a nested backward pass inside the
    # loss's) failed with "Trying to backward an extra time".
    import functools

    from torch.utils.checkpoint import (
        CheckpointPolicy,
        checkpoint,
        create_selective_checkpoint_contexts,
    )

    def policy(ctx, op, *args, **kwargs):
        keep = op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    labels, x = _batch(SEEDS[1])
    x = leaf(x)
    layer = torch.nn.Linear(x.shape[1], 5).double()
    margin = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    calls = []

    def region(e):
        calls.append(None)
        return function_loss(mining, labels, layer(e), margin, "euclidean")

    wanted = (x, margin, layer.weight)
    want = torch.autograd.grad(region(x), wanted)
    calls.clear()
    options = {"context_fn": functools.partial(create_selective_checkpoint_contexts, policy)}
    value = checkpoint(region, x, use_reentrant=False, **(options if selective else {}))
    got = torch.autograd.grad(value, wanted)
    assert len(calls) == 2, "the forward and one recomputation"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TIGHT)


@pytest.mark.parametrize("target", ["all", "hard", "semihard", "recall", "map"])
def test_dispatch_mode_exception_raised_as_is(target):
    # A TorchDispatchMode runs for the core's operations too; what it raises
    # there reached the caller as an empty "libtorch error: ".
    from torch.utils._python_dispatch import TorchDispatchMode

    from online_triplet_loss.metrics import mean_average_precision_at_r, recall_at_k

    class Refused(Exception):
        pass

    class Refusing(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen += 1
            if self.seen > 3:
                raise Refused(f"refused {func}")
            return func(*args, **(kwargs or {}))

    labels, x = _batch(SEEDS[3])
    x = leaf(x)
    run = {
        "recall": lambda: recall_at_k(x, labels, ks=[1, 2]),
        "map": lambda: mean_average_precision_at_r(x, labels),
    }.get(target, lambda: function_loss(target, labels, x, 0.5, "euclidean"))
    want = run()
    with pytest.raises(Refused, match="refused aten"):
        with Refusing():
            run()

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Counting():
        got = run()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("target", ["all", "hard", "semihard", "recall", "all-refs", "hard-refs"])
def test_dispatch_mode_exception_at_any_operation_no_panic(target, grad, capfd):
    # Raised at each of the core's operations in turn: the caller gets it
    # as is, and nothing reaches stderr (a non-fallible tch call, such as
    # detach, panicked there and printed a Rust backtrace first).
    from torch.utils._python_dispatch import TorchDispatchMode

    from online_triplet_loss.metrics import recall_at_k

    class Refused(Exception):
        pass

    class RefuseAt(TorchDispatchMode):
        def __init__(self, at):
            super().__init__()
            self.at, self.seen = at, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen += 1
            if self.seen == self.at:
                raise Refused(f"refused {func}")
            return func(*args, **(kwargs or {}))

    labels, x = _batch(SEEDS[4])
    x = leaf(x)
    bank = torch.randn(5, x.shape[1], dtype=x.dtype, generator=torch.Generator().manual_seed(4))
    refs = dict(ref_embeddings=torch.cat([x.detach(), bank]),
                ref_labels=torch.cat([labels, labels[:5]]), anchor_offset=0)
    mining = target.removesuffix("-refs")
    run = {"recall": lambda: recall_at_k(x, labels, ks=[1, 2])}.get(
        target, lambda: function_loss(mining, labels, x, 0.5, "euclidean",
                                      **(refs if target.endswith("-refs") else {})))
    with torch.set_grad_enabled(grad):
        counting = RefuseAt(0)
        with counting:
            run()
        assert counting.seen > 10
        for at in range(1, counting.seen + 1):
            with pytest.raises(Refused, match="refused aten"):
                with RefuseAt(at):
                    run()
            assert torch.is_grad_enabled() == grad
    out, err = capfd.readouterr()
    assert not any(word in out + err for word in ("panicked", "unwrap", "RUST_BACKTRACE")), err[-2000:]


def test_a_keyboard_interrupt_the_witness_missed_is_a_keyboard_interrupt():
    """Ctrl-C can land in torch's own Python dispatch code, between the
    modes, where no mode's try sees it: the core then fails with its text
    alone, which must still come out as a KeyboardInterrupt."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from online_triplet_loss import _native

    class Passing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    def core():
        raise RuntimeError("libtorch error: KeyboardInterrupt: <EMPTY MESSAGE>")

    with Passing():
        with pytest.raises(KeyboardInterrupt):
            _native.call(core)
        with pytest.raises(RuntimeError, match="other"):
            _native.call(lambda: (_ for _ in ()).throw(RuntimeError("libtorch error: other")))


@pytest.mark.parametrize("mining", ["all", "hard", "semihard"])
def test_compiled_autograd(mining):
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd",
                                            reason="this torch has no compiled autograd")
    if not hasattr(compiled_autograd, "_enable"):
        pytest.skip("this torch's compiled autograd has no _enable")
    labels, x = _batch(SEEDS[2])
    x = leaf(x)
    loss = lambda e: function_loss(mining, labels, e, 0.5, "euclidean")  # noqa: E731
    (want,) = torch.autograd.grad(loss(x), x)
    with compiled_autograd._enable(torch.compile(backend="eager")):
        loss(x).backward()
    torch.testing.assert_close(x.grad, want, **TIGHT)
