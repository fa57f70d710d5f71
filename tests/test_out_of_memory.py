"""Allocation failures inside the Rust core: an exception as torch raises it
(RuntimeError on the CPU, ``torch.OutOfMemoryError`` on CUDA, see
tests/test_cuda.py), with libtorch's message and without its C++ stack, no
panic text on stderr, grad mode kept, and the process alive to retry.

Each case runs in a child process whose address space is capped
(``RLIMIT_AS``, its soft limit) a little above what it has mapped, so allocations fail for
certain whatever the machine's memory and overcommit policy. The sweep of
caps runs the portable kernels, which allocate nothing but tensors, and the
native kernels meet the cap at the embeddings' first copy. The native CPU
kernels' own buffers (Rust vectors, whose failed allocation would abort the
process) are reserved fallibly: a malloc shim fails each of their large
allocations in turn, and every one gives a MemoryError.
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


# ------------------------------------------------- host buffers of the native kernels

_FAIL_MALLOC = r"""
#include <errno.h>
#include <stddef.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);

/* Fails the `nth` allocation of at least `threshold` bytes after arming;
   0 disarms. */
static size_t threshold, nth, seen;

void failmalloc_arm(size_t t, size_t n) { threshold = t; nth = n; seen = 0; }

static int fails(size_t size) {
    return threshold && size >= threshold && ++seen == nth;
}

void *malloc(size_t size) {
    if (fails(size)) { errno = ENOMEM; return NULL; }
    return __libc_malloc(size);
}

void *calloc(size_t count, size_t size) {
    if (size && count <= (size_t)-1 / size && fails(count * size)) { errno = ENOMEM; return NULL; }
    return __libc_calloc(count, size);
}

void *realloc(void *ptr, size_t size) {
    if (fails(size)) { errno = ENOMEM; return NULL; }
    return __libc_realloc(ptr, size);
}
"""

_NTH_ALLOCATION_CHILD = textwrap.dedent(
    """
    import ctypes, json, sys
    import torch
    from online_triplet_loss import _core
    from online_triplet_loss.metrics import mean_average_precision_at_r, recall_at_k

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=g)
    refs = torch.randn(3000, 16, generator=g)
    # Classes of 8 take the half-matrix kernels; of 32, the chunked ones.
    big, pk = torch.arange(4096) % 128, torch.arange(4096) // 8

    def terms(mining, labels, chunk, y=None):
        def call():
            leaf = x.clone().requires_grad_()
            ref = None if y is None else (y.clone().requires_grad_(), torch.arange(len(y)) % 128)
            s, c, v = _core.triplet_terms(mining, labels, leaf, 0.2, "euclidean", False,
                                          *(ref or (None, None)), None, chunk)
            s.backward()
            grads = [leaf.grad] + ([] if ref is None else [ref[0].grad])
            return [float(s.detach()), int(c), int(v)] + [float(t.abs().sum()) for t in grads]
        return call

    # Two threads: a fixed number of parallel blocks, whose buffers grow.
    cases = {
        "recall_at_k": lambda: recall_at_k(x, pk, ks=(1, 5)),
        "map_at_r": lambda: [mean_average_precision_at_r(x, pk)],
    }
    for mining in ["all", "hard", "semihard"]:
        cases[f"{mining}/half-matrix"] = terms(mining, pk, 128)
        cases[f"{mining}/chunks"] = terms(mining, big, 512)
        cases[f"{mining}/references"] = terms(mining, big, 512, refs)
    arm = ctypes.CDLL(None).failmalloc_arm
    arm.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    report = {}
    for name, call in cases.items():
        want = call()
        failures, got = [], None
        for nth in range(1, 2000):
            arm(64 << 10, nth)
            try:
                got = call()
            except BaseException as err:
                arm(0, 0)
                failures.append([type(err).__name__, str(err)[:200], torch.is_grad_enabled()])
                continue
            arm(0, 0)
            break
        # After every failure the same call gives the same result.
        report[name] = {"failures": failures, "last": got, "want": want, "again": call()}
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def fail_malloc(tmp_path_factory):
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the malloc shim")
    d = tmp_path_factory.mktemp("failmalloc")
    (d / "failmalloc.c").write_text(_FAIL_MALLOC)
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(d / "failmalloc.so"),
                    str(d / "failmalloc.c")], check=True, capture_output=True)
    return d / "failmalloc.so"


def test_every_large_host_allocation_can_fail_cleanly(fail_malloc):
    """The native kernels keep their buffers in Rust vectors, and a vector
    that cannot be allocated aborts the process (SIGABRT, "memory allocation
    of N bytes failed") unless it is reserved fallibly. A malloc shim fails
    the first, then the second, ... allocation of at least 64 KiB that each
    call makes (the core's buffers, libtorch's and Python's own; tensors'
    storage comes from posix_memalign and is not touched), until a call
    gets through: every failure is a MemoryError or a RuntimeError, grad
    mode is kept, and
    the same call then gives the same result. The core's own failures are
    HostOutOfMemoryError, a MemoryError and a RuntimeError."""
    import os

    env = dict(os.environ, LD_PRELOAD=str(fail_malloc))
    proc = subprocess.run([sys.executable, "-c", _NTH_ALLOCATION_CHILD], capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert "panicked" not in proc.stderr, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, r in report.items():
        assert r["last"] == r["want"] == r["again"], (name, r)
        core = 0
        for kind, message, grad_enabled in r["failures"]:
            assert grad_enabled, (name, kind, message)
            if message.startswith("out of host memory"):
                assert kind == "HostOutOfMemoryError", (name, kind, message)
                core += 1
            else:  # libtorch's C++ buffers (std::bad_alloc), Python's
                assert kind in ("MemoryError", "RuntimeError"), (name, kind, message)
        # The sweep reaches each call's own buffers, not only torch's.
        assert core > 0, (name, r["failures"])


def test_host_out_of_memory_error_is_a_memory_and_a_runtime_error():
    from online_triplet_loss import HostOutOfMemoryError

    assert issubclass(HostOutOfMemoryError, MemoryError)
    assert issubclass(HostOutOfMemoryError, RuntimeError)
