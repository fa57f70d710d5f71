"""Under torch.no_grad (a validation loss) or torch.inference_mode the losses
compute their value only: batch-all and semi-hard skip the gradient they
otherwise compute while mining (for batch-all, two matrix products per
chunk), and the value is bit for bit the one computed with gradients.

Layout: values on every path (the half-matrix kernels, chunks, reference
sets, the portable kernels) -> the products skipped, counted by a dispatch
mode -> gradients still computed when only the references require grad ->
non-finite input -> forward-mode AD, refused by batch-all and semi-hard.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.autograd import forward_ad
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import DISTANCES, LOSSES, grad_of, leaf
from online_triplet_loss import (_core, batch_all_triplet_loss, batch_hard_triplet_loss,
                                 batch_semihard_triplet_loss)

MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def _batch(seed=0, n=256, classes=32, dim=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (n,), generator=g), torch.randn(n, dim, generator=g)


def _terms(mining, labels, x, distance, chunk=None, portable=False, refs=None):
    y, y_labels = refs if refs is not None else (None, None)
    return _core.triplet_terms(mining, labels, x, 0.2, distance, False, y, y_labels, None, chunk,
                               portable=portable)


# Chunks of 16 rows make 16 chunks of the 256-row batch: the half-matrix
# kernels take it (with classes of at most 17); 4 classes of 64 rows go
# through the chunked kernels.
PATHS = {
    "half-matrix": dict(classes=32, chunk=16),
    "chunks": dict(classes=4, chunk=16),
    "one-chunk": dict(classes=32, chunk=None),
    "portable": dict(classes=32, chunk=16, portable=True),
    "references": dict(classes=32, chunk=16, refs=True),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", LOSSES)
def test_value_is_the_one_computed_with_gradients(mining, distance, path, mode):
    cfg = PATHS[path]
    labels, x = _batch(classes=cfg["classes"])
    refs = None
    if cfg.get("refs"):
        ref_labels, y = _batch(seed=1, n=96, classes=cfg["classes"])
        refs = (leaf(y), ref_labels)
    kw = dict(chunk=cfg["chunk"], portable=cfg.get("portable", False))
    want = _terms(mining, labels, leaf(x), distance, refs=refs, **kw)
    with MODES[mode]():
        got = _terms(mining, labels, leaf(x), distance, refs=refs, **kw)
    assert not got[0].requires_grad
    for w, g in zip(want, got):
        assert torch.equal(w.detach(), g), (w, g)


class _Products(TorchDispatchMode):
    """Counts the matrix products that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _products(mining, path, grad_mode):
    cfg = PATHS[path]
    labels, x = _batch(classes=cfg["classes"])
    with contextlib.ExitStack() as stack:
        if not grad_mode:
            stack.enter_context(torch.no_grad())
        counter = stack.enter_context(_Products())
        _terms(mining, labels, leaf(x), "euclidean", chunk=cfg["chunk"],
               portable=cfg.get("portable", False))
    return counter.count


@pytest.mark.parametrize("path", ["half-matrix", "chunks", "portable"])
def test_batch_all_skips_its_gradient_products(path):
    with_grad, without = _products("all", path, True), _products("all", path, False)
    # The distances' products remain; the gradient's two per chunk are gone.
    assert 0 < without < with_grad, (without, with_grad)


@pytest.mark.parametrize("mining", LOSSES)
def test_detached_anchors_still_give_the_references_their_gradient(mining):
    labels, x = _batch()
    ref_labels, y = _batch(seed=1, n=96)
    both = leaf(y)
    s, c, _ = _terms(mining, labels, leaf(x), "euclidean", chunk=16, refs=(both, ref_labels))
    want = grad_of(s, both)[0]
    only = leaf(y)
    s, c, _ = _terms(mining, labels, x, "euclidean", chunk=16, refs=(only, ref_labels))
    got = grad_of(s, only)[0]
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["half-matrix", "chunks", "portable"])
@pytest.mark.parametrize("mining", LOSSES)
def test_a_non_finite_embedding_still_gives_nan(mining, path):
    cfg = PATHS[path]
    labels, x = _batch(classes=cfg["classes"])
    x[7, 3] = float("inf")
    with torch.no_grad():
        s, _, _ = _terms(mining, labels, x, "euclidean", chunk=cfg["chunk"],
                         portable=cfg.get("portable", False))
    assert s.isnan(), s


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("mining", LOSSES)
def test_forward_mode_ad(mining, requires_grad):
    """Batch-all and semi-hard compute their gradient for reverse mode only
    (and none when nothing requires grad), so forward-mode AD through them
    raises instead of giving a tangent of 0; batch-hard's is its gradient
    times the tangent."""
    labels, x = _batch(n=40, classes=4)
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    fn = {"all": lambda e: batch_all_triplet_loss(labels, e, 0.2)[0],
          "hard": lambda e: batch_hard_triplet_loss(labels, e, 0.2),
          "semihard": lambda e: batch_semihard_triplet_loss(labels, e, 0.2)}[mining]
    primal = leaf(x) if requires_grad else x
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(primal, tangent)
        if mining != "hard":
            with pytest.raises(NotImplementedError, match="forward-mode AD"):
                fn(dual)
            return
        jvp = forward_ad.unpack_dual(fn(dual)).tangent
    x_ = leaf(x)
    want = (grad_of(fn(x_), x_)[0] * tangent).sum()
    torch.testing.assert_close(jvp, want)


@pytest.mark.parametrize("grad_mode", ["enabled", "no_grad"])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("mining", LOSSES)
def test_forward_mode_ad_through_the_margin(mining, requires_grad, grad_mode):
    """A margin with a tangent: batch-hard's tangent is the derivative of the
    loss in the margin (the fraction of positive hinges, here all, against
    a float64 central difference) times the margin's tangent, also when the
    margin does not require grad or grad mode is off, where the margin was
    read as a number and the tangent lost (None, a derivative of 0: found
    by a review); batch-all and semi-hard raise."""
    labels, x = _batch(n=40, classes=4)
    x = x.double()
    fn = {"all": lambda m: batch_all_triplet_loss(labels, x, m)[0],
          "hard": lambda m: batch_hard_triplet_loss(labels, x, m),
          "semihard": lambda m: batch_semihard_triplet_loss(labels, x, m)}[mining]
    margin = torch.tensor(0.7, dtype=torch.float64, requires_grad=requires_grad)
    mode = torch.no_grad() if grad_mode == "no_grad" else contextlib.nullcontext()
    with mode, forward_ad.dual_level():
        dual = forward_ad.make_dual(margin, torch.tensor(3.0, dtype=torch.float64))
        if mining != "hard":
            with pytest.raises(NotImplementedError, match="forward-mode AD"):
                fn(dual)
            return
        out = fn(dual)
        jvp = forward_ad.unpack_dual(out).tangent
    h = 1e-6
    slope = (float(fn(0.7 + h)) - float(fn(0.7 - h))) / (2 * h)
    assert slope > 0.5  # hinges are positive: a derivative to lose
    assert jvp is not None
    assert float(jvp) == pytest.approx(3.0 * slope, rel=1e-6)
