"""Argument checks shared by the public functions. The Rust core checks
shapes, dtypes and the margin; these cover what only Python sees: the types
of the settings, numbers beyond the core's 64-bit range, and the calling
context (tracing, scripting)."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

DISTANCES = ("euclidean", "squared", "cosine")
INT64_MAX = 2**63 - 1
# The label dtypes the core compares by value (the others are refused there).
LABEL_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                torch.float16, torch.bfloat16, torch.float32, torch.float64)


def resolve_distance(squared: object, distance: object) -> str:
    """The distance named by 0.0.6's ``squared`` flag and ``distance``."""
    squared = check_flag("squared", squared)
    if distance is None:
        return "squared" if squared else "euclidean"
    check_distance(distance)
    if squared and distance != "squared":
        raise ValueError(
            f"squared=True contradicts distance={distance!r}: pass distance='squared', "
            "or leave squared=False"
        )
    return distance


def check_distance(distance: object) -> str:
    """A distance named where no ``squared`` flag can stand for it: the
    Modules and the metrics."""
    if not isinstance(distance, str) or distance not in DISTANCES:
        raise ValueError(f"distance: expected one of {DISTANCES}, got {distance!r}")
    return distance


def check_flag(name: str, value: object) -> bool:
    """A bool setting: True, False, the ints 1 and 0, or a numpy bool."""
    if isinstance(value, bool) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    # np.True_ and 0-d bool arrays (numpy's dtype kind "b"), as 0.0.6 took.
    if getattr(getattr(value, "dtype", None), "kind", None) == "b" and getattr(value, "shape", None) == ():
        return bool(value)
    raise ValueError(f"{name}: must be True or False, got {value!r}")


def check_int(name: str, value: object, minimum: int, maximum: int = INT64_MAX) -> int:
    """An integer setting (not a bool) in ``[minimum, maximum]``."""
    bound = f">= {minimum}" if maximum == INT64_MAX else f"in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: must be an int {bound}, got {value!r}")
    if value > maximum:
        limit = "2**63 - 1" if maximum == INT64_MAX else str(maximum)
        raise ValueError(f"{name}: must be an int {bound} and at most {limit}, got {value!r}")
    return int(value)


def check_dense(name: str, value: torch.Tensor) -> None:
    """A strided tensor: not nested, sparse or of another layout."""
    if value.is_nested or value.layout != torch.strided:
        kind = "a nested tensor" if value.is_nested else f"layout {value.layout}"
        raise ValueError(f"{name}: must be a dense (strided) tensor, got {kind}")


def check_label_dtype(name: str, labels: torch.Tensor) -> None:
    """Labels of a dtype the core takes, checked where labels are gathered
    or stored before any loss sees them."""
    if labels.dtype not in LABEL_DTYPES:
        raise ValueError(
            f"{name}: dtype {labels.dtype} is not supported; pass ids as int64 (or int8 to "
            "int32, uint8, bool or floating point)"
        )


def check_tensor(name: str, value: object) -> torch.Tensor:
    """A dense tensor on the CPU or a CUDA device."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: must be a torch.Tensor, got {type(value).__name__}")
    check_dense(name, value)
    if value.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: must be on the CPU or a CUDA device, got {value.device}")
    refuse_python_dispatch(name, value)
    return value


def check_labels(name: str, value: object) -> torch.Tensor:
    """A tensor of ids (class labels, cameras) of a dtype the core takes."""
    check_label_dtype(name, check_tensor(name, value))
    return value  # type: ignore[return-value]


def refuse_python_dispatch(name: str, value: torch.Tensor) -> None:
    """Tensor subclasses that handle their operations in Python
    (``__torch_dispatch__``: DTensor, FakeTensor, MaskedTensor, ...) hold no
    memory of their own, or not all of it, where the native code would read
    it. ``__torch_function__`` subclasses and ``nn.Parameter`` hold theirs."""
    if torch._C._dispatch_keys(value).has(torch._C.DispatchKey.Python):
        raise ValueError(
            f"{name}: must be a plain tensor, got a {type(value).__name__}, a tensor subclass "
            f"that dispatches its operations in Python, whose memory the native code cannot "
            f"read; pass a plain tensor (a DTensor's full_tensor() or to_local(), say)"
        )


def check_margin(margin: object) -> float:
    """The margin's value as a float: a real number, a one-element NumPy
    array or a one-element CPU tensor, finite and >= 0."""
    value = margin
    if isinstance(margin, torch.Tensor):
        refuse_python_dispatch("margin", margin)
        if margin.numel() != 1 or margin.device.type != "cpu":
            raise ValueError(
                "margin: must be a number or a one-element CPU tensor, got a tensor of shape "
                f"{tuple(margin.shape)} on {margin.device}"
            )
        if margin.dtype == torch.bool or margin.is_complex():
            raise ValueError(f"margin: must be a real number, got a tensor of dtype {margin.dtype}")
        value = margin.detach().item()  # a CPU tensor: no device synchronisation
    elif hasattr(margin, "shape") and hasattr(margin, "item") and math.prod(margin.shape) == 1:
        # A one-element NumPy array, as 0.0.6 and sentence-transformers take.
        value = margin.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"margin: must be a number, got {_shown(margin)}")
    try:
        result = float(value)
    except OverflowError:
        raise ValueError(f"margin: must be finite and >= 0, got {_shown(margin)}") from None
    if not math.isfinite(result) or result < 0:
        hint = ""
        if isinstance(margin, torch.Tensor) and margin.requires_grad and result < 0:
            # The loss never decreases as the margin grows, so gradient
            # descent alone takes a learned margin below 0.
            hint = (
                "; a learned margin that the optimiser took below 0 can be kept at 0 with "
                "margin.data.clamp_(min=0) after each step"
            )
        shown = _shown(margin)
        if isinstance(margin, torch.Tensor):  # one line, not a Parameter's two
            shown = f"{result!r} (a tensor{', requiring grad' if margin.requires_grad else ''})"
        raise ValueError(f"margin: must be finite and >= 0, got {shown}{hint}")
    return result


def _shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for a message, its middle cut when it is long (an int
    of 400 digits, say)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's limit on digits it converts
        return f"an int of {value.bit_length()} bits"  # type: ignore[attr-defined]
    if len(text) <= limit:
        return text
    return f"{text[:limit // 2]}...{text[-limit // 4:]} ({len(text)} characters)"


def margin_and_tensor(margin: object) -> Tuple[float, Optional[torch.Tensor]]:
    """The margin's value, and the margin itself when it is a tensor that
    gradients should reach (a floating tensor requiring grad, with grad mode
    on); ``None`` otherwise."""
    value = check_margin(margin)
    if (
        isinstance(margin, torch.Tensor)
        and margin.requires_grad
        and margin.is_floating_point()
        and torch.is_grad_enabled()
    ):
        return value, margin
    return value, None


def check_references(ref_embeddings: object, ref_labels: object) -> None:
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("ref_embeddings and ref_labels: must be given together")
    if ref_embeddings is not None:
        check_tensor("ref_embeddings", ref_embeddings)
        check_labels("ref_labels", ref_labels)


def reference_parts(ref_embeddings: object,
                    ref_labels: object) -> Optional[Tuple[torch.Tensor, ...]]:
    """``None``, or a loss's reference embeddings as parts whose rows follow
    each other: one tensor, or a non-empty list or tuple of them."""
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("ref_embeddings and ref_labels: must be given together")
    if ref_embeddings is None:
        return None
    if isinstance(ref_embeddings, (list, tuple)):
        parts = tuple(ref_embeddings)
        if not parts:
            raise ValueError(
                "ref_embeddings: got an empty sequence; give a tensor, or a list or tuple of "
                "tensors whose rows follow each other"
            )
    else:
        parts = (ref_embeddings,)
    for part in parts:
        check_tensor("ref_embeddings", part)
    check_labels("ref_labels", ref_labels)
    return parts


def check_anchor_offset(
    anchor_offset: object, embeddings: torch.Tensor,
    ref_embeddings: Optional[Tuple[torch.Tensor, ...]],
) -> Optional[int]:
    """``None``, or the row of the reference set (in parts,
    :func:`reference_parts`) where the anchors start: an int with the
    anchors' rows inside the reference set."""
    if anchor_offset is None:
        return None
    if isinstance(anchor_offset, bool) or not isinstance(anchor_offset, numbers.Integral):
        raise ValueError(f"anchor_offset: must be None or an int, got {anchor_offset!r}")
    if ref_embeddings is None:
        if anchor_offset != 0:
            raise ValueError(
                "anchor_offset: without ref_embeddings the batch is its own reference set "
                f"at offset 0; got {anchor_offset!r}"
            )
        return None
    if embeddings.dim() >= 1 and all(part.dim() >= 1 for part in ref_embeddings):
        anchors, references = embeddings.shape[0], sum(part.shape[0] for part in ref_embeddings)
        if not 0 <= anchor_offset <= references - anchors:
            raise ValueError(
                f"anchor_offset: the {anchors} anchors at rows {anchor_offset!r}.. must lie "
                f"inside the {references} rows of ref_embeddings, so 0 <= anchor_offset <= "
                f"{references - anchors}; got {anchor_offset!r}"
            )
    elif not 0 <= anchor_offset <= INT64_MAX:
        # A 0-d tensor leaves its error to the core, whose binding takes the
        # offset as an int64 first.
        raise ValueError(f"anchor_offset: must be an int in [0, 2**63 - 1], got {anchor_offset!r}")
    return int(anchor_offset)


def refuse_tracing(name: str) -> None:
    """Tracing records no mining (it runs outside the graph): the traced
    loss would be a constant. Refuse it plainly."""
    if torch.jit.is_tracing():
        raise RuntimeError(
            f"{name}: torch.jit.trace is not supported: the triplet mining and the metrics run "
            "in native code outside the traced graph, so the traced result would be a constant. "
            "Trace the model alone and call the loss or metric on its outputs in Python."
        )
    transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if transforms_active is not None and transforms_active():
        raise RuntimeError(
            f"{name}: torch.func transforms (vmap, grad, jacrev, ...) are not supported: the "
            "triplet mining runs in native code on plain tensors. Use torch.autograd instead."
        )
    # Dynamo (torch.compile, torch.export's strict mode) never traces the
    # losses and metrics: they are compiler-disabled (_native.boundary).
    if torch.compiler.is_exporting():
        raise RuntimeError(
            f"{name}: torch.export is not supported: the triplet mining and the metrics run in "
            "native code that export cannot capture. Export the model alone and call the loss "
            "or metric on its outputs in Python."
        )


def refuse_scripting(name: str) -> None:
    raise RuntimeError(
        f"{name}: torch.jit.script is not supported: the losses call native code that "
        "TorchScript cannot compile. Script the model alone and call the loss on its outputs "
        "in Python."
    )
