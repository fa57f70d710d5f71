"""Parity with pytorch-metric-learning (PML), an independent implementation
of the same losses: its ``TripletMarginLoss`` on all triplets (batch-all) or
on ``BatchHardMiner``'s (batch-hard), with its distances, against reference
sets, and its ``CrossBatchMemory`` over steps that wrap the memory around;
the metrics against its ``AccuracyCalculator``.

What PML defines differently is left out: its semi-hard miner keeps every
triplet with d_ap < d_an < d_ap + m, not one negative per positive pair; its
cross-batch memory holds the current batch and detaches it, so its gradient
reaches the batch as anchors only (ours reaches it as references too), and
for the same reference set its memory is ``memory_size + B`` long.
"""

from __future__ import annotations

import pytest
import torch

from online_triplet_loss import (
    BatchAllTripletLoss,
    BatchHardTripletLoss,
    CrossBatchMemory,
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
)
from helpers import grad_of, leaf

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")

DISTANCES = ("euclidean", "squared", "cosine")
SEEDS = range(6)
CLOSE = dict(rtol=1e-9, atol=1e-12)


@pytest.fixture(autouse=True)
def _softplus_to_40(monkeypatch):
    """PML's smooth loss is torch's softplus, which returns z itself above
    z = 20, e^-20 (2e-9) below log(1 + e^z), with a slope of exactly 1; the
    soft margin here is log(1 + e^z) up to 40, past which float64 rounds it
    to z. PML gets the same threshold, so that the two compute one function
    (squared distances of these batches reach z > 20)."""
    softplus = torch.nn.functional.softplus
    monkeypatch.setattr(torch.nn.functional, "softplus",
                        lambda x, beta=1.0, threshold=20.0: softplus(x, beta, max(threshold, 40.0)))


def _pml_distance(distance):
    if distance == "cosine":
        return pml_distances.CosineSimilarity()  # margin: s_an - s_ap = d_ap - d_an
    power = 2 if distance == "squared" else 1
    return pml_distances.LpDistance(normalize_embeddings=False, p=2, power=power)


def _pml_loss(mining, margin, distance, soft=False):
    """PML's batch-all (all triplets, averaged over the positive ones) or
    batch-hard (the miner's one triplet per anchor, averaged over anchors)."""
    dist = _pml_distance(distance)
    if mining == "all":
        loss = pml_losses.TripletMarginLoss(margin=margin, distance=dist)
        return loss, None
    loss = pml_losses.TripletMarginLoss(margin=margin, distance=dist, smooth_loss=soft,
                                        reducer=pml_reducers.MeanReducer())
    return loss, pml_miners.BatchHardMiner(distance=_pml_distance(distance))


def _batch(seed, classes=(2, 6), per_class=(2, 5), dim=(2, 9)):
    """P classes of K >= 2 samples, shuffled, float64: every anchor has a
    positive and a negative, where the two libraries define the same thing."""
    g = torch.Generator().manual_seed(seed)
    p = int(torch.randint(*classes, (1,), generator=g))
    k = int(torch.randint(*per_class, (1,), generator=g))
    labels = torch.arange(p).repeat_interleave(k)[torch.randperm(p * k, generator=g)] * 3 + 7
    x = torch.randn(p * k, int(torch.randint(*dim, (1,), generator=g)), generator=g,
                    dtype=torch.float64)
    return labels, x


def _ours(mining, labels, x, margin, distance, soft=False, **refs):
    if mining == "all":
        return batch_all_triplet_loss(labels, x, margin, distance=distance, **refs)[0]
    return batch_hard_triplet_loss(labels, x, margin, distance=distance, soft=soft, **refs)


MININGS = [("all", False), ("hard", False), ("hard", True)]


def test_pml_is_the_real_package():
    import pytorch_metric_learning
    assert pytorch_metric_learning.__version__.startswith("2.")
    loss, _ = _pml_loss("all", 0.5, "euclidean")
    assert type(loss).__module__.startswith("pytorch_metric_learning.")


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining, soft", MININGS)
def test_loss_and_gradient_equal_pml(mining, soft, distance):
    nonzero = 0
    for seed in SEEDS:
        labels, x = _batch(seed)
        for margin in (0.0, 0.3, 2.0):
            loss, miner = _pml_loss(mining, margin, distance, soft)
            a, b = leaf(x), leaf(x)
            want = loss(b, labels, miner(b, labels) if miner else None)
            got = _ours(mining, labels, a, margin, distance, soft)
            torch.testing.assert_close(got, want, **CLOSE)
            torch.testing.assert_close(grad_of(got, a)[0], grad_of(want, b)[0], **CLOSE)
            nonzero += bool(want.detach() > 0)
    assert nonzero > len(SEEDS)  # the hinges are not all inactive


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining, soft", MININGS)
def test_module_equals_pml(mining, soft, distance):
    labels, x = _batch(11)
    loss, miner = _pml_loss(mining, 0.4, distance, soft)
    module = (BatchAllTripletLoss(margin=0.4, distance=distance) if mining == "all"
              else BatchHardTripletLoss(margin=0.4, distance=distance, soft=soft))
    got = module(x, labels)
    got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, loss(x, labels, miner(x, labels) if miner else None), **CLOSE)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining, soft", MININGS)
def test_reference_sets_equal_pml(mining, soft, distance):
    """Anchors mined against a separate reference set (labels that the batch
    lacks, too); the gradient reaches the anchors and the references."""
    for seed in SEEDS:
        labels, x = _batch(seed)
        g = torch.Generator().manual_seed(100 + seed)
        ref_labels = torch.cat([labels, torch.tensor([1000, 1000, 1001])])
        ref_labels = ref_labels[torch.randperm(len(ref_labels), generator=g)]
        refs = torch.randn(len(ref_labels), x.shape[1], generator=g, dtype=torch.float64)
        loss, miner = _pml_loss(mining, 0.5, distance, soft)
        a, ra, b, rb = leaf(x), leaf(refs), leaf(x), leaf(refs)
        want = loss(b, labels, miner(b, labels, rb, ref_labels) if miner else None,
                    ref_emb=rb, ref_labels=ref_labels)
        got = _ours(mining, labels, a, 0.5, distance, soft, ref_embeddings=ra,
                    ref_labels=ref_labels)
        torch.testing.assert_close(got, want, **CLOSE)
        for g_ours, g_pml in zip(grad_of(got, a, ra), grad_of(want, b, rb)):
            torch.testing.assert_close(g_ours, g_pml, **CLOSE)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining, soft", MININGS)
def test_cross_batch_memory_equals_pml(mining, soft, distance):
    """Ten steps of batches of 8 through a memory of 20 (ours) and of 28
    (PML's, which holds the current batch): the same reference sets, filling
    and wrapping around; the losses are equal at every step."""
    memory_size, batch = 20, 8
    inner = (BatchAllTripletLoss(margin=0.5, distance=distance) if mining == "all"
             else BatchHardTripletLoss(margin=0.5, distance=distance, soft=soft))
    ours = CrossBatchMemory(inner, memory_size=memory_size)
    loss, miner = _pml_loss(mining, 0.5, distance, soft)
    theirs = pml_losses.CrossBatchMemory(loss, embedding_size=5,
                                         memory_size=memory_size + batch, miner=miner)
    g = torch.Generator().manual_seed(3)
    for step in range(10):
        labels = torch.arange(4).repeat(2)[torch.randperm(batch, generator=g)] + step % 3
        x = torch.randn(batch, 5, generator=g, dtype=torch.float64)
        got = ours(x, labels)
        got = got[0] if isinstance(got, tuple) else got
        torch.testing.assert_close(got, theirs(x, labels), **CLOSE, msg=f"step {step}")


@pytest.mark.parametrize("distance", ("euclidean", "cosine"))
def test_metrics_equal_pml_accuracy_calculator(distance):
    """recall@1 is PML's precision_at_1 and MAP@R its mean_average_precision_at_r,
    with items whose label no other item has among the references only."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    from online_triplet_loss.metrics import mean_average_precision_at_r, recall_at_k

    knn = CustomKNN(pml_distances.CosineSimilarity() if distance == "cosine"
                    else pml_distances.LpDistance(normalize_embeddings=False))
    calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                                    knn_func=knn, k="max_bin_count", device=torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        labels = torch.cat([torch.randint(0, 6, (70,), generator=g), torch.tensor([50, 51])])
        x = torch.randn(len(labels), 4, generator=g, dtype=torch.float64)
        want = calculator.get_accuracy(x, labels)
        assert recall_at_k(x, labels, ks=(1,), distance=distance)[1] == pytest.approx(
            want["precision_at_1"], rel=1e-12)
        assert mean_average_precision_at_r(x, labels, distance=distance) == pytest.approx(
            want["mean_average_precision_at_r"], rel=1e-12)
