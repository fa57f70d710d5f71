"""The extension records the torch it was built against, and the package refuses
another torch minor before the extension is loaded."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import online_triplet_loss
from online_triplet_loss import _core
from online_triplet_loss._torch_check import _advice, recorded_torch_version

PACKAGE = Path(online_triplet_loss.__file__).parent
PREFIX = b"online-triplet-loss built against torch "

# Imports the package copied under argv[1]; prints the outcome and whether the
# copied extension was mapped into the process.
IMPORT_COPY = r"""
import sys
root = sys.argv[1]
sys.path.insert(0, root)
try:
    import online_triplet_loss
    print("IMPORTED", online_triplet_loss.__file__)
except ImportError as err:
    print("IMPORT-ERROR", err)
with open("/proc/self/maps") as maps:
    print("MAPPED" if root in maps.read() else "NOT-MAPPED")
"""


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def test_extension_records_the_torch_it_was_built_against():
    recorded = recorded_torch_version(_core.__file__)
    assert recorded == _core.TORCH_VERSION
    # The suite runs under the torch it built against.
    assert _minor(recorded) == _minor(torch.__version__)


def _copy_package(tmp_path: Path) -> Path:
    copy = tmp_path / "online_triplet_loss"
    copy.mkdir()
    for path in PACKAGE.glob("*.py"):
        shutil.copy(path, copy)
    libs = PACKAGE.with_name("online_triplet_loss.libs")  # what auditwheel grafts in a wheel
    if libs.is_dir():
        shutil.copytree(libs, tmp_path / libs.name)
    return copy


def _import_copy(tmp_path: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", IMPORT_COPY, str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _with_record(tmp_path: Path, version: str) -> None:
    """Copies the package with the real extension, its record rewritten to ``version``."""
    data = Path(_core.__file__).read_bytes()
    old = PREFIX + _core.TORCH_VERSION.encode()
    new = PREFIX + version.encode()
    assert len(new) == len(old) and data.count(old) == 1
    (_copy_package(tmp_path) / Path(_core.__file__).name).write_bytes(data.replace(old, new))


def _same_length(version: str, major: str | None = None, patch: str | None = None) -> str:
    """``version`` with its major (one digit) or patch field replaced, same length."""
    base, _, local = version.partition("+")
    parts = base.split(".")
    if major is not None:
        parts[0] = major
    if patch is not None:
        parts[2] = patch * len(parts[2])
    return ".".join(parts) + (f"+{local}" if local else "")


def test_other_torch_minor_is_an_import_error_before_loading(tmp_path):
    other = _same_length(_core.TORCH_VERSION, major="9")
    _with_record(tmp_path, other)
    out = _import_copy(tmp_path)
    assert "IMPORT-ERROR" in out, out
    assert f"built against torch {other}" in out
    assert f"torch {torch.__version__} is imported" in out
    assert "make develop" in out and "pip install --no-build-isolation" in out
    # The real, loadable extension was never mapped: the check ran first.
    assert "NOT-MAPPED" in out, out


def test_same_torch_minor_loads(tmp_path):
    _with_record(tmp_path, _same_length(_core.TORCH_VERSION, patch="9"))
    out = _import_copy(tmp_path)
    assert f"IMPORTED {tmp_path}" in out, out
    assert "\nMAPPED" in out, out


def test_extension_without_record_is_an_import_error(tmp_path):
    # Not a shared library at all: loading it would fail differently ("invalid ELF header").
    (_copy_package(tmp_path) / Path(_core.__file__).name).write_bytes(b"\x7fELF" + b"\0" * 64)
    out = _import_copy(tmp_path)
    assert "IMPORT-ERROR" in out and "does not record the torch" in out, out
    assert torch.__version__ in out


@pytest.mark.parametrize("running", ["2.16.0", "2.10.1+cu128", "3.13.0", "2.9.0a0+git1234"])
def test_unsupported_torch_gets_the_supported_range_not_a_rebuild(running):
    advice = _advice(running)
    assert f"torch {running} is not supported" in advice
    assert "torch 2.11 to 2.15" in advice and "'torch>=2.11,<2.16'" in advice
    assert "make develop" not in advice and "wheel built for" not in advice


@pytest.mark.parametrize("running, release", [("2.11.0", "2.11.0"), ("2.13.0+cu130", "2.13.0"),
                                              ("2.15.1", "2.15.1"), ("2.11.0a0+6a974be", "2.11.0")])
def test_supported_torch_gets_the_rebuild_in_this_environment(running, release):
    advice = _advice(running)
    assert "pip install --no-build-isolation --force-reinstall --no-deps ." in advice
    assert f"`make develop TORCH={release}`" in advice
    assert f"wheel built for torch {_minor(running)}" in advice
