"""Allocation failures inside the Rust core: an exception as torch raises it
(RuntimeError on the CPU, ``torch.OutOfMemoryError`` on CUDA, see
tests/test_cuda.py), with libtorch's message and without its C++ stack, no
panic text on stderr, grad mode kept, and the process alive to retry.

Each case runs in a child process whose address space is capped
(``RLIMIT_AS``, its soft limit) a little above what it has mapped, so allocations fail for
certain whatever the machine's memory and overcommit policy. Only tensor
allocations are made to fail: the native CPU kernels' own buffers are Rust
vectors, whose allocation failure aborts the process (Rust's rule), so the
sweep of caps runs the portable kernels, which allocate nothing but tensors,
and the native kernels only meet the cap at the embeddings' first copy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's"
)

_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    import online_triplet_loss as otl
    from online_triplet_loss import _core
    from online_triplet_loss.metrics import recall_at_k

    case, extra_mib = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)

    def mapped():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    def loss(out):
        return out[0] if isinstance(out, tuple) else out

    calls = []
    if case == "copy":
        # 2 GiB once contiguous: the first copy of the embeddings fails.
        x = torch.zeros(1, 1 << 17).expand(4096, 1 << 17).requires_grad_()
        y = torch.arange(4096) % 64
        for name in ["batch_all_triplet_loss", "batch_hard_triplet_loss",
                     "batch_semihard_triplet_loss"]:
            for distance in ["euclidean", "cosine"]:
                calls.append((f"{name}/{distance}", lambda n=name, d=distance:
                              loss(getattr(otl, n)(y, x, 0.2, distance=d)).backward()))
        calls.append(("recall_at_k", lambda: recall_at_k(x.detach(), y, ks=(1,))))
    else:
        # The portable kernels on a batch whose chunk buffers pass the cap.
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8192, 16, generator=g, requires_grad=True)
        y = torch.arange(8192) % 1024
        for mining in ["all", "hard", "semihard"]:
            for distance in ["euclidean", "cosine"]:
                calls.append((f"{mining}/{distance}", lambda m=mining, d=distance:
                              _core.triplet_terms(m, y, x, 0.2, d, False,
                                                  portable=True)[0].backward()))
    # Loaded before the cap: the core and torch's lazily loaded parts.
    otl.batch_hard_triplet_loss(torch.tensor([0, 0, 1, 1]), torch.randn(4, 3), 0.2)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = mapped() + (extra_mib << 20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    out = []
    for name, call in calls:
        try:
            call()
            out.append([name, None, None, torch.is_grad_enabled()])
        except BaseException as err:
            out.append([name, type(err).__name__, str(err), torch.is_grad_enabled()])
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    # Alive and still right after the failures.
    after = otl.batch_all_triplet_loss(torch.tensor([0, 0, 1]), torch.tensor([[0.], [1.], [3.]]), 5.0)
    print(json.dumps({"results": out, "after": float(after[0])}))
    """
)


def _run(case: str, extra_mib: int):
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, case, str(extra_mib)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert "panicked" not in proc.stderr, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # Triplets (0, 1, 2) and (1, 0, 2): hinges 5 + 1 - 3 and 5 + 1 - 2, both active.
    assert report["after"] == 3.5
    return report["results"]


def _check_failure(name, kind, message, grad_enabled):
    assert grad_enabled, name
    assert kind == "RuntimeError", (name, kind, message)
    assert message.startswith("libtorch error: "), (name, message)
    assert "can't allocate memory" in message, (name, message)
    for leak in ["frame #", "Exception raised from", "unwrap()", "Torch(", "Internal torch error"]:
        assert leak not in message, (name, message)


def test_first_copy_of_embeddings_fails_cleanly():
    results = _run("copy", 1024)
    assert len(results) == 7
    for name, kind, message, grad_enabled in results:
        assert kind is not None, f"{name}: 2 GiB under a 1 GiB cap did not fail"
        _check_failure(name, kind, message, grad_enabled)


def test_portable_kernels_fail_cleanly_at_every_cap():
    failed = 0
    for extra_mib in [8, 32, 64, 96, 128]:
        for name, kind, message, grad_enabled in _run("portable", extra_mib):
            if kind is None:
                assert grad_enabled, name
                continue
            failed += 1
            _check_failure(f"{name} at +{extra_mib} MiB", kind, message, grad_enabled)
    # The sweep must reach the failures it is for.
    assert failed >= 6, failed
