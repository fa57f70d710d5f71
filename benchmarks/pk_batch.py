"""The batch every benchmark here times: P×K labels (K samples of each of
B/K classes, shuffled unless asked otherwise) and embeddings drawn from
randn / √D, both from one generator seeded with ``seed``."""

from __future__ import annotations

import math
from typing import Tuple

import torch


def pk_batch(B: int, K: int, D: int, seed: int, device: object = "cpu",
             shuffled: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(labels, embeddings) on ``device``; the embeddings do not require grad."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(B // K).repeat_interleave(K)
    if shuffled:
        labels = labels[torch.randperm(B, generator=gen)]
    x = torch.randn(B, D, generator=gen) / math.sqrt(D)
    return labels.to(device), x.to(device)
