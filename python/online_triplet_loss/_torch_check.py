"""Refuses an extension built against another torch minor, before loading it.

The extension `_core` links libtorch's C++ API, which changes between torch
minors: a library built against 2.13 loads under 2.12 and then aborts the
process on its first call. Its build records the torch it was compiled
against as one string inside the library file (see
crates/online-triplet-loss-py/build.rs); this module reads that string from
the file, without loading it, and compares it with the imported torch.
"""

import importlib.util
import re

import torch

__all__ = ["check_torch"]

_RECORD = re.compile(rb"online-triplet-loss built against torch (\d+\.\d+[0-9A-Za-z.+_-]*)\0")

# The torch minors the build supports: tools/torch_build.py's TCH_FOR_TORCH
# (tests/test_torch_check.py checks that the two agree).
SUPPORTED = ((2, 11), (2, 15))

_REBUILD = (
    "Rebuild it in this environment: in a clone of online-triplet-loss, run `pip install "
    "--no-build-isolation --force-reinstall --no-deps .` (`make develop TORCH={torch}` builds "
    "it into the clone's own venv instead); or install its wheel built for torch {torch_minor}."
)
_UNSUPPORTED = (
    "online-triplet-loss supports torch {first} to {last}; install one of those (pip install "
    "'torch>={first},<{after}') and the extension built for it."
)


def _advice(running: str) -> str:
    """How to get an extension for torch ``running``."""
    minor = tuple(int(part) for part in _minor(running).split(".")[:2] if part.isdigit())
    (major, first), (_, last) = SUPPORTED
    if len(minor) == 2 and SUPPORTED[0] <= minor <= SUPPORTED[1]:
        # The release pip installs: 2.11.0 for a source build's 2.11.0a0+git...
        release = re.match(r"\d+\.\d+(\.\d+)?", running).group(0)
        return _REBUILD.format(torch=release, torch_minor=_minor(running))
    return f"torch {running} is not supported: " + _UNSUPPORTED.format(
        first=f"{major}.{first}", last=f"{major}.{last}", after=f"{major}.{last + 1}")


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def recorded_torch_version(path: str):
    """The torch version recorded in the extension at ``path``, or None if it records none."""
    with open(path, "rb") as f:
        match = _RECORD.search(f.read())
    return match.group(1).decode() if match else None


def check_torch(package: str) -> None:
    """Raises ImportError unless ``package._core`` was built against the imported torch's minor."""
    spec = importlib.util.find_spec(f"{package}._core")
    if spec is None or spec.origin is None:
        return  # the import of _core itself reports the missing extension
    built = recorded_torch_version(spec.origin)
    running = torch.__version__
    if built is None:
        raise ImportError(
            f"{spec.origin} does not record the torch it was built against; this torch is "
            f"{running}. " + _advice(running)
        )
    if _minor(built) != _minor(running):
        raise ImportError(
            f"online_triplet_loss's extension was built against torch {built}, but torch "
            f"{running} is imported; libtorch's C++ interface differs between the two. "
            + _advice(running)
        )
