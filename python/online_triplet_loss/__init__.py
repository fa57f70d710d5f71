"""Triplet losses with exact online mining, on a Rust core.

``import torch`` runs first: it loads the libtorch that the extension links to.
Then the torch the extension was built against is checked, before the
extension is loaded.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from ._torch_check import check_torch

check_torch(__name__)

from .losses import (
    BatchAllTripletLoss,
    BatchHardTripletLoss,
    BatchSemiHardTripletLoss,
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    batch_semihard_triplet_loss,
)
from ._core import HostOutOfMemoryError
from .memory import CrossBatchMemory
from .samplers import PKSampler
from . import metrics, samplers

__version__ = "0.1.0"

__all__ = [
    "batch_all_triplet_loss",
    "batch_hard_triplet_loss",
    "batch_semihard_triplet_loss",
    "BatchAllTripletLoss",
    "BatchHardTripletLoss",
    "BatchSemiHardTripletLoss",
    "CrossBatchMemory",
    "HostOutOfMemoryError",
    "PKSampler",
    "metrics",
    "samplers",
]
