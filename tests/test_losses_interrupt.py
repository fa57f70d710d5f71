"""Ctrl-C during a long loss. The losses run in native code without the GIL;
between chunks of anchors (at most every 100 ms) they run Python's signal
handlers, as the metrics do, so Ctrl-C stops a batch of tens of thousands
early instead of at its end. Checked in a child process under repeated
SIGINTs, on the half-matrix kernels and on the chunked path (a batch with
identical rows), against the same call without signals."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import SIGINT_CHILD

_CHILD = SIGINT_CHILD + """
import threading, time
import torch
from online_triplet_loss.losses import (
    batch_all_triplet_loss, batch_hard_triplet_loss, batch_semihard_triplet_loss)

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)

def batch(b, tied):
    labels = torch.randint(0, b // 8, (b,), generator=g)
    x = torch.randn(b, 16, generator=g)
    if tied:
        x[1] = x[0]  # identical rows: the chunked path, not the half matrix
    return labels, x

# From half a second to a few seconds each here, single-threaded.
CASES = [
    (batch_all_triplet_loss, batch(16384, False)),
    (batch_all_triplet_loss, batch(16384, True)),
    (batch_semihard_triplet_loss, batch(16384, False)),
    (batch_semihard_triplet_loss, batch(16384, True)),
    (batch_hard_triplet_loss, batch(32768, False)),
    (batch_hard_triplet_loss, batch(16384, True)),
]

def run(loss, labels, x):
    leaf = x.clone().requires_grad_()
    value = loss(labels, leaf, margin=0.2)
    if isinstance(value, tuple):
        value = value[0]
    value.backward()
    return value.detach(), leaf.grad

for i, (loss, (labels, x)) in enumerate(CASES):
    call = lambda: run(loss, labels, x)
    start = time.perf_counter()
    want = call()
    whole = time.perf_counter() - start
    case = (loss.__name__, len(x), i % 2 == 1, whole)
    # Ctrl-C: a KeyboardInterrupt early, not at the end; grad mode kept.
    got, seconds, _ = interrupted(call, KeyboardInterrupt)
    assert isinstance(got, KeyboardInterrupt), (case, got)
    assert seconds < 0.1 + whole / 2, (case, seconds)
    assert torch.is_grad_enabled(), case
    # A handler's own exception comes out unchanged.
    got, _, _ = interrupted(call, Stop)
    assert isinstance(got, Stop) and str(got) == "from the handler", (case, got)
    # One that returns lets the loss finish, with the same bits.
    got, _, signals = interrupted(call, None)
    assert signals > 0, case
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), case
# On another thread, where Python runs no handler, the same bits.
loss, (labels, x) = CASES[0]
want, box = run(loss, labels, x), []
worker = threading.Thread(target=lambda: box.append(run(loss, labels, x)))
got, _, signals = interrupted(lambda: (worker.start(), worker.join(), box)[2], None)
assert signals > 0 and len(got) == 1, signals
assert torch.equal(got[0][0], want[0]) and torch.equal(got[0][1], want[1])
print("ok")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_stops_a_long_loss_between_chunks():
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
