#!/usr/bin/env python
"""Chunk-size sweep: forward+backward time and peak device memory of each loss
as a function of the anchors mined at a time (the chunk), in one process.

The default chunk (``CHUNK_ELEMENTS`` and ``MIN_CHUNK_ROWS`` in
crates/online-triplet-loss/src/losses.rs) was tuned on a 2-core CPU. This
measures the same losses with explicit chunk sizes (``_core.triplet_terms``'s
``chunk_size``) beside the default and the bare ``x @ x.T`` of the batch, so
that a policy for another device is set from measurements. Every figure is a
median of ``--repeats`` runs after one warm-up; a chunk whose warm-up exceeds
``--time-cap`` seconds, or whose estimated temporaries exceed
``--mem-cap-gb``, is reported and not timed.

    python benchmarks/chunk_sizes.py --device cuda --out DIR
    python benchmarks/chunk_sizes.py --device cpu --sizes 1024 --chunks 64,256,1024

Writes ``chunk_sizes.json`` and ``chunk_sizes.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch

from online_triplet_loss import _core
from pk_batch import pk_batch

MININGS = ("hard", "semihard", "all")
# temporaries of one chunk, in chunk x B float32 matrices, at most (an
# overestimate for the skip rule: the portable path holds a handful at once)
TEMPORARIES = 12


def timed(fn: Callable[[], None], device: torch.device, repeats: int, cap: float) -> dict:
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm = once()
    out: dict = {"warmup_s": warm}
    if warm > cap:
        out["status"] = f"over time cap ({warm:.2f} s > {cap:g} s)"
        return out
    times = [once() for _ in range(max(1, min(repeats, int(cap // max(warm, 1e-9)))))]
    out.update(status="ok", median_s=statistics.median(times), times_s=times)
    if device.type == "cuda":
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="16384,65536", help="batch sizes B")
    ap.add_argument("--chunks", default="2048,8192",
                    help="anchors per chunk (the default policy is always measured too)")
    ap.add_argument("--minings", default=",".join(MININGS))
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--time-cap", type=float, default=3.0, help="seconds per run")
    ap.add_argument("--mem-cap-gb", type=float, default=40.0)
    ap.add_argument("--budget", type=float, default=0.0, help="seconds; no measurement starts after it (0: none)")
    ap.add_argument("--out", default="chunk-sizes-out")
    args = ap.parse_args(argv)

    started = time.monotonic()
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()), "D": args.dim, "K": args.k, "repeats": args.repeats,
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("OMP_", "CUDA_", "PYTORCH_"))},
    }
    rows: List[dict] = []

    def save() -> None:
        meta["loadavg_end"] = list(os.getloadavg())
        (out / "chunk_sizes.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        lines = [f"# Chunk sizes on {meta['device_name']} (torch {meta['torch']}, D={args.dim}, K={args.k}, "
                 f"median of {args.repeats})", "",
                 "| B | mining | chunk | time | × gemm | peak device memory |", "|---|---|---|---|---|---|"]
        gemm = {r["B"]: r.get("median_s") for r in rows if r["mining"] == "gemm"}
        for r in rows:
            t = r.get("median_s")
            ratio = f"{t / gemm[r['B']]:.2f}" if t and gemm.get(r["B"]) else ""
            peak = f"{r['peak_bytes'] / 1e9:.2f} GB" if r.get("peak_bytes") else ""
            lines.append(f"| {r['B']} | {r['mining']} | {r['chunk']} | "
                         f"{f'{t * 1e3:.2f} ms' if t else r['status']} | {ratio} | {peak} |")
        (out / "chunk_sizes.md").write_text("\n".join(lines) + "\n")

    sizes = [int(s) for s in args.sizes.split(",") if s]
    chunks = [int(c) for c in args.chunks.split(",") if c]
    minings = [m for m in args.minings.split(",") if m]
    for B in sizes:
        labels, x = pk_batch(B, args.k, args.dim, B, device)
        x.requires_grad_()

        def gemm() -> None:
            with torch.no_grad():
                x @ x.T

        if 4 * B * B <= args.mem_cap_gb * 1e9:
            rows.append(dict(B=B, mining="gemm", chunk="-", **timed(gemm, device, args.repeats, args.time_cap)))
        for mining in minings:
            for chunk in [None] + [c for c in chunks if c < B] + [B]:
                row = dict(B=B, mining=mining, chunk="default" if chunk is None else chunk)
                if args.budget and time.monotonic() - started > args.budget:
                    rows.append(dict(row, status="not run (budget spent)"))
                    continue
                est = TEMPORARIES * 4 * min(chunk or B, B) * B
                if chunk is not None and est > args.mem_cap_gb * 1e9:
                    rows.append(dict(row, status=f"skipped: ~{est / 1e9:.0f} GB of temporaries"))
                    continue

                def step() -> None:
                    x.grad = None
                    s, c, _ = _core.triplet_terms(mining, labels, x, 0.2, "euclidean", False, None, None, None,
                                                  chunk)
                    (s / c.clamp_min(1)).backward()

                try:
                    row.update(timed(step, device, args.repeats, args.time_cap))
                except torch.cuda.OutOfMemoryError as exc:
                    row.update(status=f"out of memory: {str(exc)[:120]}")
                except RuntimeError as exc:
                    row.update(status=f"error: {str(exc)[:200]}")
                rows.append(row)
                print(json.dumps({k: row.get(k) for k in ("B", "mining", "chunk", "status", "median_s",
                                                          "peak_bytes")}), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                save()
        del x, labels
    save()
    print(f"wrote {out / 'chunk_sizes.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
