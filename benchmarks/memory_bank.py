#!/usr/bin/env python
"""Losses against a memory bank: forward+backward of B anchors mined against M
stored embeddings, as a multiple of the product they cannot avoid.

Two ways in, each per loss and distance:

- ``refs``: the functions with ``ref_embeddings`` = the memory (which does not
  require grad) and no anchor offset: the anchors get a gradient, the memory
  none.
- ``cat``: the functions with ``ref_embeddings=torch.cat([batch, memory])``
  and ``anchor_offset=0``: gradients reach the batch as anchors and as
  references; the losses compute one for every stored row too, which
  autograd then drops.
- ``parts``: the same with ``ref_embeddings=(batch, memory)``, in parts: no
  gradient is computed for the memory.
- ``xbm``: :class:`~online_triplet_loss.CrossBatchMemory` holding M entries,
  which gives the core the batch and the memory in parts.

The yardstick is the bare product ``x @ memory.T`` (B x M x D, no grad), the
faster of the whole product and blocks of rows. Every row records the load
average before and after it and the torch threads; a ratio measured under a
load above the number of CPUs is marked ``(under load)``. Run it on a quiet
machine::

    python benchmarks/memory_bank.py --anchors 256 --memory 65536 --dim 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pk_batch import pk_batch  # noqa: E402

import online_triplet_loss as otl  # noqa: E402
from online_triplet_loss import losses  # noqa: E402

FUNCTIONS = {
    "hard": losses.batch_hard_triplet_loss,
    "all": losses.batch_all_triplet_loss,
    "semihard": losses.batch_semihard_triplet_loss,
}
MODULES = {
    "hard": otl.BatchHardTripletLoss,
    "all": otl.BatchAllTripletLoss,
    "semihard": otl.BatchSemiHardTripletLoss,
}


def median_time(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gemm_time(x: torch.Tensor, memory: torch.Tensor, repeats: int) -> float:
    out = torch.empty(x.shape[0], memory.shape[0])
    rows = max(1, (1 << 22) // memory.shape[0])

    def blocks():
        for s in range(0, x.shape[0], rows):
            torch.mm(x[s:s + rows], memory.T, out=out[s:s + rows])

    with torch.no_grad():
        return min(median_time(lambda: x @ memory.T, repeats), median_time(blocks, repeats))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--anchors", type=int, default=256, help="batch size B")
    ap.add_argument("--memory", type=int, default=65536, help="stored embeddings M")
    ap.add_argument("--dim", type=int, default=128, help="embedding dimension D")
    ap.add_argument("--k", type=int, default=8, help="samples per class in the batch")
    ap.add_argument("--classes", type=int, default=8192, help="classes the memory's labels come from")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--ways", default="refs,cat,parts,xbm",
                    help="comma-separated ways in: refs, cat, parts, xbm")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpus = os.cpu_count() or 1
    labels, x = pk_batch(args.anchors, args.k, args.dim, seed=0)
    gen = torch.Generator().manual_seed(1)
    memory = torch.randn(args.memory, args.dim, generator=gen) / args.dim ** 0.5
    memory_labels = torch.randint(0, args.classes, (args.memory,), generator=gen)
    print(f"B={args.anchors} M={args.memory} D={args.dim} K={args.k}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {cpus} CPUs, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'default')}")
    gemm = gemm_time(x, memory, args.repeats)
    print(f"gemm x @ memory.T: {gemm * 1e3:.1f} ms (load {os.getloadavg()[0]:.2f})\n")
    print("| way | mining | distance | median | × gemm | load before / after |")
    print("|---|---|---|---|---|---|")
    ways = args.ways.split(",")
    unknown = set(ways) - {"refs", "cat", "parts", "xbm"}
    if unknown:
        ap.error(f"--ways: unknown {sorted(unknown)}")
    with_batch = torch.cat([labels, memory_labels])
    for way in ways:
        for mining in FUNCTIONS:
            for distance in ("euclidean", "cosine"):
                leaf = x.clone().requires_grad_(True)
                if way == "refs":
                    def loss():
                        return FUNCTIONS[mining](labels, leaf, margin=0.2, distance=distance,
                                                 ref_embeddings=memory, ref_labels=memory_labels)
                elif way in ("cat", "parts"):
                    def loss():
                        refs = torch.cat([leaf, memory]) if way == "cat" else (leaf, memory)
                        return FUNCTIONS[mining](labels, leaf, margin=0.2, distance=distance,
                                                 ref_embeddings=refs, ref_labels=with_batch,
                                                 anchor_offset=0)
                else:
                    xbm = otl.CrossBatchMemory(MODULES[mining](margin=0.2, distance=distance),
                                               memory_size=args.memory).eval()
                    xbm.enqueue(memory, memory_labels)

                    def loss():
                        return xbm(leaf, labels)

                def step():
                    leaf.grad = None
                    out = loss()
                    (out[0] if isinstance(out, tuple) else out).backward()

                before = os.getloadavg()[0]
                t = median_time(step, args.repeats)
                after = os.getloadavg()[0]
                mark = " (under load)" if max(before, after) > cpus else ""
                print(f"| {way} | {mining} | {distance} | {t * 1e3:.1f} ms | "
                      f"{t / gemm:.2f}×{mark} | {before:.2f} / {after:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
