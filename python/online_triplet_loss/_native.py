"""Calls into the Rust core that keep the exceptions Python code raised inside.

The core runs libtorch operations, which can call back into Python: autograd
runs the active saved-tensor pack hook when an operation saves a tensor, and
the dispatcher runs the active ``TorchDispatchMode`` for every operation.
An exception raised there reaches the core as a C++ error with no text, and
would reach the caller as an empty "libtorch error". A non-reentrant
``torch.utils.checkpoint`` stops its recomputation of the forward with such
an exception, and selective checkpointing and user modes raise their own.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, List, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode

__all__ = ["boundary", "call"]


class _Witness(TorchDispatchMode):
    """Runs each operation under the modes below it, keeping what they raise."""

    def __init__(self, raised: List[BaseException]) -> None:
        super().__init__()
        self.raised = raised

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        try:
            return func(*args, **(kwargs or {}))
        except BaseException as exc:
            self.raised.append(exc)
            raise


_REASON = (
    "online_triplet_loss: the triplet mining and the metrics run in native code, which "
    "torch.compile and torch.export cannot trace; compile or export the model alone (under "
    "torch.compile without fullgraph=True the loss runs eagerly, a graph break)"
)

F = TypeVar("F", bound=Callable[..., Any])


def boundary(fn: F) -> F:
    """``fn``, which dynamo (torch.compile, torch.export's strict mode) does
    not trace: without fullgraph=True the graph breaks before it and ``fn``
    runs eagerly; with it, dynamo stops saying why. Applied where the
    arguments are first read, so that dynamo meets this reason before a
    margin tensor's value or the core."""
    return torch.compiler.disable(fn, reason=_REASON)


@boundary
def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, a function of the core, raising what a pack
    hook or a dispatch mode raised inside it, as it was raised."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = None if top is None else top(False)
    mode = _get_current_dispatch_mode()
    if hooks is None and mode is None:
        return fn(*args, **kwargs)
    raised: List[BaseException] = []
    with contextlib.ExitStack() as stack:
        if hooks is not None:
            pack, unpack = hooks

            def keep(tensor):
                try:
                    return pack(tensor)
                except BaseException as exc:
                    raised.append(exc)
                    raise

            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(keep, unpack))
        if mode is not None:
            stack.enter_context(_Witness(raised))
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            # Whatever the core made of it (a probe that failed reads as a
            # bad layout, say), the exception raised inside is the cause.
            if raised:
                raise raised[0] from err
            raise
