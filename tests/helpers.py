"""Small helpers shared by the test modules."""

from __future__ import annotations

import torch

from online_triplet_loss import (
    BatchAllTripletLoss,
    BatchHardTripletLoss,
    BatchSemiHardTripletLoss,
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    batch_semihard_triplet_loss,
)

LOSSES = ("all", "hard", "semihard")
DISTANCES = ("euclidean", "squared", "cosine")
MARGINS = (0.0, 0.2, 1.0)


def configs():
    """(mining, distance, margin, soft) for every loss / distance / margin,
    soft on and off for batch-hard."""
    out = []
    for mining in LOSSES:
        for distance in DISTANCES:
            for margin in MARGINS:
                for soft in ((False, True) if mining == "hard" else (False,)):
                    out.append((mining, distance, margin, soft))
    return out


def config_id(cfg) -> str:
    mining, distance, margin, soft = cfg
    return f"{mining}-{distance}-m{margin}" + ("-soft" if soft else "")


def function_loss(mining, labels, embeddings, margin, distance, soft=False, **kw):
    """The public function's loss (batch-all: the first output)."""
    if mining == "all":
        assert not soft
        return batch_all_triplet_loss(labels, embeddings, margin, distance=distance, **kw)[0]
    if mining == "hard":
        return batch_hard_triplet_loss(labels, embeddings, margin, distance=distance, soft=soft, **kw)
    if mining == "semihard":
        assert not soft
        return batch_semihard_triplet_loss(labels, embeddings, margin, distance=distance, **kw)
    raise ValueError(mining)


def make_module(mining, margin, distance, soft=False):
    if mining == "all":
        return BatchAllTripletLoss(margin=margin, distance=distance)
    if mining == "hard":
        return BatchHardTripletLoss(margin=margin, distance=distance, soft=soft)
    if mining == "semihard":
        return BatchSemiHardTripletLoss(margin=margin, distance=distance)
    raise ValueError(mining)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def grad_of(loss: torch.Tensor, *inputs: torch.Tensor):
    """Gradients of ``loss`` w.r.t. ``inputs`` (zeros where unused)."""
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
