"""Tensor subclasses. Those that dispatch their operations in Python
(``__torch_dispatch__``: FakeTensor, DTensor, MaskedTensor) hold no memory of
their own where the native code reads it, and crashed the process: every
entry point refuses them with a ValueError naming the argument. Those that
only override ``__torch_function__``, and ``nn.Parameter``, hold their
memory and give the plain tensor's result."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

import reference as R
from helpers import LOSSES, function_loss
from online_triplet_loss import BatchHardTripletLoss, CrossBatchMemory
from online_triplet_loss.metrics import mean_average_precision_at_r, recall_at_k

LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def _embeddings() -> torch.Tensor:
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


@contextlib.contextmanager
def _fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        yield lambda t: mode.from_tensor(t)


@contextlib.contextmanager
def _masked():
    from torch.masked import masked_tensor

    yield lambda t: masked_tensor(t, torch.ones_like(t, dtype=torch.bool))


@contextlib.contextmanager
def _dtensor():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        yield lambda t: distribute_tensor(t, mesh, [Replicate()])
    finally:
        dist.destroy_process_group()


SUBCLASSES = {"FakeTensor": _fake, "MaskedTensor": _masked, "DTensor": _dtensor}


def _calls(wrap, x, y):
    """(argument name, call) for each entry point, with one argument wrapped."""
    margin = torch.tensor(0.2)
    calls = []
    for mining in LOSSES:
        calls += [
            ("embeddings", lambda m=mining: function_loss(m, y, wrap(x), 0.2, "euclidean", False)),
            ("labels", lambda m=mining: function_loss(m, wrap(y), x, 0.2, "euclidean", False)),
            ("ref_embeddings", lambda m=mining: function_loss(
                m, y, x, 0.2, "euclidean", False, ref_embeddings=wrap(x), ref_labels=y)),
            ("margin", lambda m=mining: function_loss(
                m, y, x, wrap(margin), "euclidean", False)),
        ]
    calls += [
        ("embeddings", lambda: recall_at_k(wrap(x), y, ks=(1,))),
        ("labels", lambda: mean_average_precision_at_r(x, wrap(y))),
        ("embeddings", lambda: CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=16)(
            wrap(x), y)),
        ("margin", lambda: BatchHardTripletLoss(margin=wrap(margin))),
    ]
    return calls


@pytest.mark.parametrize("subclass", sorted(SUBCLASSES))
def test_python_dispatch_subclasses_are_refused_naming_the_argument(subclass):
    # Made before FakeTensorMode, which would make them fake.
    x, y = _embeddings(), LABELS
    with SUBCLASSES[subclass]() as wrap:
        for name, call in _calls(wrap, x, y):
            with pytest.raises(ValueError, match=f"^{name}: must be a plain tensor, got a {subclass}"):
                call()
    assert torch.is_grad_enabled()


class _Logged(torch.Tensor):
    """A ``__torch_function__`` subclass, as tracking and logging tools make."""


@pytest.mark.parametrize("mining", LOSSES)
def test_torch_function_subclasses_and_parameters_give_the_plain_result(mining):
    x = _embeddings()
    want = R.reference_terms(mining, LABELS, x, 0.2, "euclidean", False).loss
    for wrapped in [x.as_subclass(_Logged), nn.Parameter(x.clone())]:
        got = function_loss(mining, LABELS, wrapped, 0.2, "euclidean", False)
        assert float(got) == pytest.approx(float(want), rel=1e-12)
