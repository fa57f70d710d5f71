"""Argument checks shared by the public functions. The Rust core checks
shapes, dtypes and the margin; these cover what only Python sees."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

DISTANCES = ("euclidean", "squared", "cosine")


def resolve_distance(squared: object, distance: Optional[str]) -> str:
    """The distance named by 0.0.6's ``squared`` flag and ``distance``."""
    if not isinstance(squared, (bool, numbers.Integral)) or squared not in (0, 1):
        raise ValueError(f"squared: must be True or False, got {squared!r}")
    if distance is None:
        return "squared" if squared else "euclidean"
    if distance not in DISTANCES:
        raise ValueError(f"distance: expected one of {DISTANCES}, got {distance!r}")
    if squared and distance != "squared":
        raise ValueError(
            f"squared=True contradicts distance={distance!r}: pass distance='squared', "
            "or leave squared=False"
        )
    return distance


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_margin(margin: object) -> float:
    if isinstance(margin, torch.Tensor):
        if margin.numel() != 1 or margin.device.type != "cpu":
            raise ValueError(
                "margin: must be a number or a one-element CPU tensor, got a tensor of shape "
                f"{tuple(margin.shape)} on {margin.device}"
            )
        margin = margin.item()
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
        raise ValueError(f"margin: must be a number, got {margin!r}")
    value = float(margin)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"margin: must be finite and >= 0, got {margin!r}")
    return value


def check_references(ref_embeddings: object, ref_labels: object) -> None:
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("ref_embeddings and ref_labels: must be given together")
    if ref_embeddings is not None:
        check_tensor("ref_embeddings", ref_embeddings)
        check_tensor("ref_labels", ref_labels)
