"""Drop-in parity with online_triplet_loss 0.0.6 (downloaded from PyPI by the
``otl006`` fixture; a failed download fails these tests)."""

from __future__ import annotations

import re

import pytest
import torch

import online_triplet_loss
from conftest import make_batch
from helpers import grad_of, leaf


def _every_anchor_has_positive_and_negative(labels):
    ids = labels.tolist()
    counts = {c: ids.count(c) for c in set(ids)}
    return len(counts) >= 2 and min(counts.values()) >= 2


def _pk_batch(seed, dtype=torch.float64):
    """P classes x K samples (K >= 2), shuffled: every anchor has a positive
    and a negative."""
    g = torch.Generator().manual_seed(seed)
    p = int(torch.randint(2, 7, (1,), generator=g))
    k = int(torch.randint(2, 6, (1,), generator=g))
    labels = torch.arange(p).repeat_interleave(k)[torch.randperm(p * k, generator=g)] * 5 + 1
    emb = torch.randn(p * k, int(torch.randint(2, 9, (1,), generator=g)), generator=g,
                      dtype=torch.float64).to(dtype)
    return labels, emb


# --------------------------------------------------------------------- smoke


def test_006_is_the_real_package(otl006):
    assert otl006.__name__ == "online_triplet_loss_006"
    assert set(otl006.__all__) == {"batch_hard_triplet_loss", "batch_all_triplet_loss"}
    # it is not this package
    assert otl006.batch_all_triplet_loss is not online_triplet_loss.batch_all_triplet_loss


def test_star_import_exposes_the_006_names():
    namespace = {}
    exec("from online_triplet_loss.losses import *", namespace)
    assert callable(namespace["batch_all_triplet_loss"])
    assert callable(namespace["batch_hard_triplet_loss"])
    assert namespace["batch_all_triplet_loss"] is online_triplet_loss.batch_all_triplet_loss
    assert namespace["batch_hard_triplet_loss"] is online_triplet_loss.batch_hard_triplet_loss


def test_signatures_accept_006_calls(otl006):
    """Positional and keyword forms used with 0.0.6."""
    labels, emb = _pk_batch(1)
    for call in (
        lambda f: f(labels, emb, 0.5),
        lambda f: f(labels, emb, 0.5, True),
        lambda f: f(labels, emb, margin=0.5, squared=False),
        lambda f: f(labels=labels, embeddings=emb, margin=0.5, squared=True),
    ):
        out = call(online_triplet_loss.batch_all_triplet_loss)
        assert isinstance(out, tuple) and len(out) == 2
        assert call(online_triplet_loss.batch_hard_triplet_loss).shape == ()


# ---------------------------------------------------------------- README


def _readme_code_blocks(readme: str):
    blocks = re.findall(r"```(?:python)?\n(.*?)```", readme, flags=re.S)
    return [b for b in blocks if b.strip()]


def test_006_readme_example_runs_unchanged(readme_006, otl006, capsys):
    """The README of 0.0.6 (nn.Embedding(10, 10), random labels, margin=100),
    executed verbatim after its documented import line."""
    blocks = _readme_code_blocks(readme_006)
    joined = "\n".join(blocks)
    assert "nn.Embedding(10, 10)" in joined and "margin=100" in joined
    assert "batch_hard_triplet_loss" in joined and "batch_all_triplet_loss" in joined
    assert "from online_triplet_loss.losses import *" in readme_006
    torch.manual_seed(0)
    namespace = {}
    exec("from online_triplet_loss.losses import *", namespace)
    for block in blocks:
        exec(compile(block, "<0.0.6 README>", "exec"), namespace)
    assert torch.isfinite(namespace["loss"])
    assert namespace["model"].weight.grad is not None
    assert torch.isfinite(namespace["model"].weight.grad).all()
    out = capsys.readouterr().out
    assert "Loss:" in out

    # and on the README's inputs, batch-all agrees with 0.0.6
    labels, model = namespace["labels"], namespace["model"]
    ours, frac = online_triplet_loss.batch_all_triplet_loss(labels, model(labels), squared=False, margin=100)
    theirs, frac006 = otl006.batch_all_triplet_loss(labels, model(labels), squared=False, margin=100)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frac.float(), frac006.float(), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------- batch-all


def _batch_all_parity(otl006, labels, emb, margin, squared, tol):
    x1, x2 = leaf(emb), leaf(emb)
    ours, frac = online_triplet_loss.batch_all_triplet_loss(labels, x1, margin, squared)
    theirs, frac006 = otl006.batch_all_triplet_loss(labels, x2, margin, squared)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), **tol)
    torch.testing.assert_close(frac.double(), torch.as_tensor(frac006).double(), rtol=1e-6, atol=1e-9)
    if theirs.requires_grad:
        (g1,) = grad_of(ours, x1)
        (g2,) = grad_of(theirs, x2)
        torch.testing.assert_close(g1, g2, **tol)


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("margin", [0.0, 0.3, 1.0, 100.0])
@pytest.mark.parametrize("seed", range(8))
def test_batch_all_matches_006(otl006, squared, margin, seed):
    b = make_batch(4000 + seed, min_size=3, max_size=32)
    _batch_all_parity(otl006, b.labels, b.embeddings, margin, squared,
                      dict(rtol=1e-9, atol=1e-10))


@pytest.mark.parametrize("squared", [False, True])
def test_batch_all_matches_006_float32(otl006, squared):
    for seed in range(6):
        b = make_batch(4100 + seed, min_size=3, max_size=32, dtype=torch.float32)
        _batch_all_parity(otl006, b.labels, b.embeddings, 0.5, squared, dict(rtol=2e-4, atol=2e-5))


@pytest.mark.parametrize("squared", [False, True])
def test_batch_all_matches_006_float_labels(otl006, squared):
    labels, emb = _pk_batch(9)
    _batch_all_parity(otl006, labels.float() / 2, emb, 0.5, squared, dict(rtol=1e-9, atol=1e-10))


# ------------------------------------------------------------ batch-hard


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("margin", [0.0, 0.3, 1.0, 100.0])
@pytest.mark.parametrize("seed", range(8))
def test_batch_hard_matches_006_when_every_anchor_is_valid(otl006, squared, margin, seed):
    """0.0.6 averages over all anchors; on batches where every anchor has a
    positive and a negative the two definitions agree."""
    labels, emb = _pk_batch(5000 + seed)
    assert _every_anchor_has_positive_and_negative(labels)
    x1, x2 = leaf(emb), leaf(emb)
    ours = online_triplet_loss.batch_hard_triplet_loss(labels, x1, margin, squared)
    theirs = otl006.batch_hard_triplet_loss(labels, x2, margin, squared)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)
    (g1,) = grad_of(ours, x1)
    (g2,) = grad_of(theirs, x2)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-9)


def test_batch_hard_differs_from_006_with_singleton_anchors(otl006):
    """Documented difference: anchors without a positive are not averaged in
    (0.0.6 counts them with loss relu(0 - d_an + m))."""
    labels = torch.tensor([0, 0, 1, 1, 2])
    emb = torch.tensor([[0.0], [1.0], [3.0], [4.5], [10.0]], dtype=torch.float64)
    ours = online_triplet_loss.batch_hard_triplet_loss(labels, emb, 5.0)
    theirs = otl006.batch_hard_triplet_loss(labels, emb, 5.0)
    # anchors 0..3: max d_ap - min d_an + 5: 1-3+5=3, 1-2+5=4, 1.5-2+5=4.5, 1.5-3.5+5=3
    assert torch.isclose(ours, torch.tensor(14.5 / 4, dtype=torch.float64))
    # 0.0.6 adds anchor 4 (no positive): relu(0 - 5.5 + 5) = 0, and divides by 5
    assert torch.isclose(theirs, torch.tensor(14.5 / 5, dtype=torch.float64))
