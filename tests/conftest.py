"""Shared fixtures: random batches and online_triplet_loss 0.0.6 from PyPI."""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
CACHE_DIR = REPO_ROOT / ".cache" / "online_triplet_loss_006"

if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

# The CI machines have 2 cores, and OpenMP's spinning worker threads slow
# every call down 10-100x when anything else wants a core, which would blow
# the time budget. One intra-op torch thread keeps the suite fast; tests of
# the paths that split work among threads set the thread count themselves.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "cuda: runs on the device OTL_TEST_DEVICE (default cuda); skipped with the reason when "
        "CUDA is missing (tests/test_cuda.py)",
    )


def pytest_terminal_summary(terminalreporter):
    """Names the reason when tests marked ``cuda`` were skipped, so that a
    run without a GPU says so even without ``-rs``."""
    reasons = {}
    for report in terminalreporter.stats.get("skipped", []):
        if "cuda" in report.keywords and isinstance(report.longrepr, tuple):
            reason = report.longrepr[2].removeprefix("Skipped: ")
            reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in reasons.items():
        terminalreporter.write_line(f"cuda: {count} test(s) skipped: {reason}", yellow=True)

@dataclass
class Batch:
    seed: int
    labels: torch.Tensor
    embeddings: torch.Tensor
    has_duplicates: bool

    def __repr__(self) -> str:  # short ids in failure reports
        return (f"Batch(seed={self.seed}, B={self.labels.shape[0]}, D={self.embeddings.shape[1]}, "
                f"classes={len(set(self.labels.tolist()))}, duplicates={self.has_duplicates})")


def make_labels(rnd: random.Random, size: int) -> torch.Tensor:
    """Random class ids: a random number of multi-sample classes plus some
    singleton classes, with non-contiguous (also negative) ids, shuffled."""
    if size == 0:
        return torch.zeros(0, dtype=torch.long)
    n_single = rnd.randint(0, max(0, size // 3))
    n_multi = size - n_single
    n_classes = rnd.randint(1, max(1, n_multi // 2)) if n_multi else 0
    ids = rnd.sample(range(-50, 200), n_classes + n_single)
    multi_ids, single_ids = ids[:n_classes], ids[n_classes:]
    labels = [rnd.choice(multi_ids) for _ in range(n_multi)] + single_ids
    rnd.shuffle(labels)
    return torch.tensor(labels, dtype=torch.long)


def make_batch(seed: int, *, duplicates: bool = False, min_size: int = 2, max_size: int = 40,
               dtype: torch.dtype = torch.float64, dim: Optional[int] = None) -> Batch:
    """A random batch of ``min_size..max_size`` samples. With ``duplicates``,
    1-3 rows are exact copies of other rows (in the same class or another)."""
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    size = rnd.randint(min_size, max_size)
    d = dim if dim is not None else rnd.randint(1, 8)
    labels = make_labels(rnd, size)
    emb = torch.randn(size, d, generator=g, dtype=torch.float64)
    emb = emb * rnd.choice([0.5, 1.0, 3.0])
    copied = False
    if duplicates and size >= 2:
        for _ in range(rnd.randint(1, 3)):
            i, j = rnd.sample(range(size), 2)
            emb[j] = emb[i]
            copied = True
    return Batch(seed, labels, emb.to(dtype), copied)


def make_reference_set(seed: int, n_anchors: int, dim: int, *, with_offset: bool):
    """Anchors and a reference set (M >= 0 rows) sharing some classes. With
    ``with_offset`` the anchors are rows ``k .. k+n`` of the reference set and
    ``k`` is returned; otherwise the offset is None."""
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    labels = make_labels(rnd, n_anchors)
    emb = torch.randn(n_anchors, dim, generator=g, dtype=torch.float64)
    extra = rnd.randint(0, 25)
    pool = labels.tolist() + [rnd.randint(-50, 200) for _ in range(3)] or [0]
    extra_labels = torch.tensor([rnd.choice(pool) for _ in range(extra)], dtype=torch.long)
    extra_emb = torch.randn(extra, dim, generator=g, dtype=torch.float64)
    if with_offset:
        k = rnd.randint(0, extra)
        ref_emb = torch.cat([extra_emb[:k], emb, extra_emb[k:]])
        ref_labels = torch.cat([extra_labels[:k], labels, extra_labels[k:]])
        return labels, emb, ref_labels, ref_emb, k
    return labels, emb, extra_labels, extra_emb, None


# Seeds of the random batches that the reference tests run on.
DISTINCT_SEEDS = list(range(100, 120))
DUPLICATE_SEEDS = list(range(500, 506))


@pytest.fixture(params=DISTINCT_SEEDS, ids=lambda s: f"distinct{s}")
def distinct_batch(request) -> Batch:
    """Random batch, sizes 2-40, random classes incl. singletons, no
    repeated rows."""
    return make_batch(request.param, duplicates=False)


@pytest.fixture(params=DUPLICATE_SEEDS, ids=lambda s: f"dup{s}")
def duplicate_batch(request) -> Batch:
    """Random batch, sizes 2-40, with 1-3 exact duplicate rows (in the same
    class or across classes): distances of exactly 0 and exact ties."""
    return make_batch(request.param, duplicates=True)


def _download_006() -> Path:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE_DIR.glob("online_triplet_loss-0.0.6-*.whl"))
    if not wheels:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "online_triplet_loss==0.0.6",
             "-d", str(CACHE_DIR)],
            capture_output=True, text=True, timeout=300,
        )
        wheels = sorted(CACHE_DIR.glob("online_triplet_loss-0.0.6-*.whl"))
        if proc.returncode != 0 or not wheels:
            # Fail, never skip: parity with 0.0.6 is a requirement.
            pytest.fail(
                "could not download online_triplet_loss==0.0.6 from PyPI "
                f"(rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}",
                pytrace=False,
            )
    return wheels[-1]


@pytest.fixture(scope="session")
def wheel_006() -> Path:
    """Path of the online_triplet_loss 0.0.6 wheel (downloaded once)."""
    return _download_006()


@pytest.fixture(scope="session")
def readme_006(wheel_006) -> str:
    """The long description (README) shipped in the 0.0.6 wheel's METADATA."""
    with zipfile.ZipFile(wheel_006) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return zf.read(name).decode("utf-8")


@pytest.fixture(scope="session")
def otl006(wheel_006):
    """online_triplet_loss 0.0.6's ``losses.py`` loaded as module
    ``online_triplet_loss_006`` (so it does not clash with this package)."""
    target = CACHE_DIR / "unpacked"
    losses_py = target / "online_triplet_loss" / "losses.py"
    if not losses_py.exists():
        with zipfile.ZipFile(wheel_006) as zf:
            zf.extractall(target)
    name = "online_triplet_loss_006"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, losses_py)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    assert os.path.samefile(module.__file__, losses_py)
    return module
