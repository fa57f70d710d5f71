#!/usr/bin/env python
"""Two fixed-shape ways of semi-hard mining one chunk, timed on a device.

One sorts the anchor's negatives (stably) and searches each positive's
distance in them: the portable kernel's (crates/online-triplet-loss/src/
mining/portable.rs, `semihard`) since the H200 measured it at 0.27 against
0.55 ms a 512-anchor chunk at B = 4096 and 1.31 against 2.09 ms at 16384.
The other, the kernel's before, places every negative in a gap between the
anchor's sorted positives (`searchsorted`), keeps each gap's nearest
negative (`scatter_reduce`) and takes a running minimum over the gaps; on
this project's 2-core CPU it is the faster (0.87 s against 1.42 s for the
portable loss at B = 4096: a stable sort of distinct values is dear there),
but the CPU runs the native kernels. This measures the two mining steps
alone, in torch, and checks that they pick the same negatives (the nearest
negative strictly above d_ap, lowest column on ties, else the farthest
negative).

    python benchmarks/semihard_variants.py --device cuda --sizes 4096,16384 --rows 512
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, List, Optional

import torch

from pk_batch import pk_batch


def by_gaps(d: torch.Tensor, same: torch.Tensor, different: torch.Tensor) -> torch.Tensor:
    n = d.shape[1]
    sorted_pos = d.where(same, torch.inf).sort(dim=1).values
    from_top = n - torch.searchsorted(sorted_pos, d, right=False)
    negative_d = d.where(different, torch.inf)
    nearest = torch.full((d.shape[0], n + 1), torch.inf, dtype=d.dtype, device=d.device)
    nearest.scatter_reduce_(1, from_top, negative_d, "amin", include_self=True)
    at_nearest = negative_d == nearest.gather(1, from_top)
    columns = torch.arange(n, device=d.device).expand(d.shape[0], n).where(at_nearest, n)
    first = torch.full((d.shape[0], n + 1), n, dtype=torch.long, device=d.device)
    first.scatter_reduce_(1, from_top, columns, "amin", include_self=True)
    running, gap = nearest.cummin(dim=1)
    beyond = (from_top - 1).clamp_min(0)
    d_above = running.gather(1, beyond)
    above = first.gather(1, gap.gather(1, beyond))
    largest = d.where(different, -torch.inf).argmax(dim=1, keepdim=True)
    return above.where(d_above.isfinite(), largest).clamp_max(n - 1)


def by_sorted_negatives(d: torch.Tensor, same: torch.Tensor, different: torch.Tensor) -> torch.Tensor:
    n = d.shape[1]
    values, order = d.where(different, torch.inf).sort(dim=1, stable=True)
    place = torch.searchsorted(values, d, right=True).clamp_max(n - 1)
    d_above = values.gather(1, place)
    above = order.gather(1, place)
    largest = d.where(different, -torch.inf).argmax(dim=1, keepdim=True)
    return above.where(d_above.isfinite(), largest)


def timed(f: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    f()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="4096,16384", help="references per chunk (the batch size B)")
    ap.add_argument("--rows", type=int, default=512, help="anchors per chunk")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# semi-hard mining of one chunk of {args.rows} anchors on {name}, torch {torch.__version__}, "
          f"D={args.dim}, K={args.k}, median of {args.repeats}\n")
    print("| B | by gaps | by sorted negatives | same picks (also on ties) |\n|---|---|---|---|")
    for B in (int(b) for b in args.sizes.split(",") if b):
        labels, x = pk_batch(B, args.k, args.dim, B)
        rows = min(args.rows, B)
        d = torch.cdist(x[:rows], x).to(device)
        labels = labels.to(device)
        same = labels[:rows, None] == labels[None, :]
        same[torch.arange(rows, device=device), torch.arange(rows, device=device)] = False
        different = labels[:rows, None] != labels[None, :]
        # the same picks, also where distances tie (rounded to halves)
        agree = all(bool(((by_gaps(e, same, different) == by_sorted_negatives(e, same, different))
                          | ~same).all()) for e in (d, (d * 2).round() / 2))
        ta = timed(lambda: by_gaps(d, same, different), device, args.repeats)
        tb = timed(lambda: by_sorted_negatives(d, same, different), device, args.repeats)
        print(f"| {B} | {ta * 1e3:.2f} ms | {tb * 1e3:.2f} ms | {'yes' if agree else 'NO'} |", flush=True)
        if not agree:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
