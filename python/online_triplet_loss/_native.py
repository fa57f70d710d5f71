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

__all__ = ["autocast_inputs", "boundary", "call"]

# The device types whose autocast could reach the core's operations.
_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocasting() -> List[str]:
    return [device for device in _AUTOCAST_DEVICES if torch.is_autocast_enabled(device)]


def autocast_inputs(*tensors: Any) -> tuple:
    """``tensors``, with those that autocast would cast for an operation of its
    float32 list (``triplet_margin_loss``, ``cdist``) cast to float32, as
    :func:`torch.amp.custom_fwd` with ``cast_inputs=torch.float32`` does: float16
    and bfloat16 tensors on a device whose autocast is on. The losses then
    compute and return float32 there, like torch's own."""
    on = _autocasting()
    if not on:
        return tensors
    return tuple(
        t.float() if isinstance(t, torch.Tensor) and t.device.type in on
        and t.dtype in (torch.float16, torch.bfloat16) else t
        for t in tensors
    )


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
    """``fn(*args, **kwargs)``, a function of the core, with autocast off (its
    products, distances and gradients, are computed in the dtypes it chose,
    not autocast's), raising what a pack hook or a dispatch mode raised
    inside it, as it was raised."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = None if top is None else top(False)
    mode = _get_current_dispatch_mode()
    autocasting = _autocasting()
    if hooks is None and mode is None and not autocasting:
        return fn(*args, **kwargs)
    raised: List[BaseException] = []
    with contextlib.ExitStack() as stack:
        for device in autocasting:
            stack.enter_context(torch.autocast(device, enabled=False))
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
            # Ctrl-C can land in torch's own Python dispatch code, outside
            # the witness, and reach the core as its text alone.
            if mode is not None and "KeyboardInterrupt" in str(err):
                raise KeyboardInterrupt() from err
            raise
