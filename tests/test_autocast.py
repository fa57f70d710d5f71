"""Under torch.autocast the losses behave as torch's own triplet_margin_loss
and cdist, which autocast runs in float32: float16 and bfloat16 embeddings
are cast to float32 and the loss is float32; and autocast does not reach the
core's products (distances, gradients), which stay in the dtypes it chose.
Checked on the CPU (bfloat16 and float16 autocast); tests/test_cuda.py has
the CUDA case."""

from __future__ import annotations

import pytest
import torch

from helpers import DISTANCES, LOSSES, function_loss, grad_of, leaf, make_module
from online_triplet_loss import BatchHardTripletLoss, CrossBatchMemory
from online_triplet_loss.distributed import DistributedTripletLoss
from online_triplet_loss.metrics import mean_average_precision_at_r, recall_at_k

AUTOCAST = (torch.bfloat16, torch.float16)


def _batch(seed=0, n=192, dim=48):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 6, (n,), generator=g), torch.randn(n, dim, generator=g)


@pytest.mark.parametrize("autocast", AUTOCAST, ids=str)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", LOSSES)
def test_float32_embeddings_give_what_they_give_without_autocast(mining, distance, autocast):
    """Bit for bit: autocast would have run the core's products in its dtype
    (batch-all's gradient came out 9e-4 off in bfloat16)."""
    labels, x = _batch()
    want = function_loss(mining, labels, a := leaf(x), 0.5, distance)
    with torch.autocast("cpu", dtype=autocast):
        got = function_loss(mining, labels, b := leaf(x), 0.5, distance)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
    assert torch.equal(grad_of(got, b)[0], grad_of(want, a)[0])


@pytest.mark.parametrize("dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", LOSSES)
def test_half_embeddings_give_a_float32_loss_under_autocast(mining, distance, dtype):
    """As autocast's float32 operations: the loss of the embeddings cast to
    float32, a float32 loss; gradients come back in their dtype. Without
    autocast the loss keeps their dtype, as torch's losses do."""
    labels, x = _batch(1)
    x = x.to(dtype)
    want = function_loss(mining, labels, a := leaf(x), 0.5, distance)
    with torch.autocast("cpu", dtype=dtype):
        got = function_loss(mining, labels, b := leaf(x), 0.5, distance)
    assert want.dtype == dtype and got.dtype == torch.float32
    plain = function_loss(mining, labels, x.float(), 0.5, distance)
    assert torch.equal(got, plain)
    assert want == plain.to(dtype)
    g_got, g_want = grad_of(got, b)[0], grad_of(want, a)[0]
    assert g_got.dtype == dtype
    torch.testing.assert_close(g_got.float(), g_want.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("mining", LOSSES)
def test_modules_reference_sets_and_margins_under_autocast(mining):
    labels, x = _batch(2)
    refs = torch.randn(50, x.shape[1], generator=torch.Generator().manual_seed(3))
    ref_labels = torch.randint(0, 6, (50,), generator=torch.Generator().manual_seed(4))
    margin = torch.tensor(0.4, requires_grad=True)
    module = make_module(mining, margin, "euclidean")
    kwargs = dict(ref_embeddings=refs.bfloat16(), ref_labels=ref_labels)
    want = module(x.bfloat16().float(), labels, ref_embeddings=refs.bfloat16().float(),
                  ref_labels=ref_labels)
    want_margin = grad_of(want, margin)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = module(x.bfloat16(), labels, **kwargs)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(grad_of(got, margin)[0], want_margin)


def test_memory_and_distributed_loss_under_autocast():
    """bfloat16 batches against a float32 memory (filled before, say by a
    float32 warm-up) or float32 extra references: the references keep their
    float32 values, as on several ranks, where the batch is cast first."""
    labels, x = _batch(5, n=64)
    warm_up = torch.randn(64, x.shape[1], generator=torch.Generator().manual_seed(8))
    memories = [CrossBatchMemory(BatchHardTripletLoss(margin=0.3), memory_size=128)
                for _ in range(2)]
    for memory in memories:
        memory.enqueue(warm_up, labels.flip(0))
    distributed = DistributedTripletLoss(BatchHardTripletLoss(margin=0.3))
    for step in range(3):
        batch = x.roll(step, 0).bfloat16()
        want = memories[0](batch.float(), labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = memories[1](batch, labels)
        assert got.dtype == torch.float32 and torch.equal(got, want), step
        extra = dict(extra_embeddings=warm_up, extra_labels=labels.flip(0))
        want = distributed(batch.float(), labels, **extra)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = distributed(batch, labels, **extra)
        assert got.dtype == torch.float32 and torch.equal(got, want), step


@pytest.mark.parametrize("mining", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=str)
def test_a_margin_of_any_dtype_gets_its_gradient_rounded_once(mining, dtype):
    """A learnable margin cast with its model (``.half()``): its gradient, a
    ratio of counts (1 for batch-all), is computed in float32 or wider and
    rounded to its dtype once; in float16 it was rounded on the way (1.27 at
    B = 1024) or lost (0 at B = 2048)."""
    g = torch.Generator().manual_seed(0)
    for batch, classes in ((1024, 16), (2048, 64)):
        x = torch.randn(batch, 16, generator=g)
        y = torch.randint(0, classes, (batch,), generator=g)
        wide = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        margin = torch.tensor(0.5, dtype=dtype, requires_grad=True)
        want = grad_of(function_loss(mining, y, x, wide, "euclidean"), wide)[0]
        got = grad_of(function_loss(mining, y, x, margin, "euclidean"), margin)[0]
        assert got.dtype == dtype and want > 0
        expected = want if dtype == torch.float64 else want.to(torch.float32).to(dtype)
        assert got == expected, (batch, got, want)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_metrics_under_autocast(distance):
    labels, x = _batch(6, n=300)
    want = (recall_at_k(x, labels, (1, 5), distance=distance),
            mean_average_precision_at_r(x, labels, distance=distance))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (recall_at_k(x, labels, (1, 5), distance=distance),
               mean_average_precision_at_r(x, labels, distance=distance))
    assert got == want
