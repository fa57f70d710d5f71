#!/usr/bin/env python
"""Where a loss spends its time on a device: the operators and kernels of
forward+backward, from ``torch.profiler``, for each mining at one batch size.

    python benchmarks/profile_losses.py --device cuda --sizes 16384 --out DIR

Writes ``profile.txt``: per (B, mining), the wall time of the profiled runs,
the number of device kernels launched per run, and the operators sorted by
their own device time (self CPU time on the CPU).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import List, Optional

import torch
from torch.profiler import ProfilerActivity, profile

from online_triplet_loss import _core
from pk_batch import pk_batch


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="16384")
    ap.add_argument("--minings", default="hard,semihard,all")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--runs", type=int, default=2, help="profiled runs after one warm-up")
    ap.add_argument("--rows", type=int, default=25, help="operators listed")
    ap.add_argument("--portable", action="store_true",
                    help="mine with libtorch operations, CUDA's path, also on the CPU")
    ap.add_argument("--out", default="profile-out")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    report = [f"# torch {torch.__version__} on "
              f"{torch.cuda.get_device_name(device) if cuda else 'cpu'}, D={args.dim}, K={args.k}, "
              f"{args.runs} profiled runs after a warm-up"
              f"{', portable mining' if args.portable else ''}", ""]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for B in (int(b) for b in args.sizes.split(",") if b):
        labels, x = pk_batch(B, args.k, args.dim, B, device)
        x.requires_grad_()
        for mining in (m for m in args.minings.split(",") if m):
            def step() -> None:
                x.grad = None
                s, c, _ = _core.triplet_terms(mining, labels, x, 0.2, "euclidean", False, None, None, None, None,
                                              portable=args.portable)
                (s / c.clamp_min(1)).backward()

            try:
                step()
                sync()
                t0 = time.perf_counter()
                with profile(activities=activities) as prof:
                    for _ in range(args.runs):
                        step()
                    sync()
                wall = (time.perf_counter() - t0) / args.runs
                events = prof.key_averages()
                kernels = sum(e.count for e in events
                              if cuda and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
                report += [f"## B={B} {mining}: {wall * 1e3:.2f} ms per run under the profiler, "
                           f"{kernels / args.runs:.0f} device kernels per run", "",
                           events.table(sort_by=sort_key, row_limit=args.rows, max_name_column_width=60), ""]
            except Exception as exc:  # noqa: BLE001 - report and go on with the next mining
                report += [f"## B={B} {mining}: failed: {type(exc).__name__}: {exc}", ""]
            (out / "profile.txt").write_text("\n".join(report) + "\n")
            print(report[-3] if len(report) >= 3 else "", flush=True)
        del x, labels
    print(f"wrote {out / 'profile.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
