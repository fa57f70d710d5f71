#!/usr/bin/env python
"""Times the retrieval metrics on a synthetic re-identification evaluation.

Queries and a gallery drawn around shared identity centres, each item with a
camera id, as in Market-1501 (3368 queries, 15913 gallery items, 751
identities, 6 cameras: the defaults, with D = 512). Times recall@{1,5,10},
MAP@R and mAP with cameras, mAP without them, ``retrieval_scores`` (rank-1/5/10,
mAP and mINP from one ranking, its mAP checked equal to the other) and, as a yardstick, the same
mAP from a plain float64 ``cdist`` and ``argsort`` in torch (in chunks of
queries), which must agree with ours. Median of ``--repeats`` runs after a
warm-up; the machine's load and torch's threads are recorded with the
results, and results measured under a load above the number of cores are
marked.

    python benchmarks/metrics.py                     # Market-1501's scale
    python benchmarks/metrics.py --queries 500 --gallery 3000 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from online_triplet_loss.metrics import (
    mean_average_precision, mean_average_precision_at_r, recall_at_k, retrieval_scores,
)


def data(args: argparse.Namespace) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed)
    centres = torch.randn(args.ids, args.dim, generator=g)

    def items(n: int) -> Dict[str, torch.Tensor]:
        labels = torch.randint(0, args.ids, (n,), generator=g)
        cameras = torch.randint(0, args.cameras, (n,), generator=g)
        embeddings = centres[labels] + args.spread * torch.randn(n, args.dim, generator=g)
        return dict(x=embeddings.to(args.device), y=labels.to(args.device), c=cameras.to(args.device))

    q, r = items(args.queries), items(args.gallery)
    return dict(x=q["x"], y=q["y"], c=q["c"], gx=r["x"], gy=r["y"], gc=r["c"])


def torch_map(d: Dict[str, torch.Tensor], chunk: int = 256) -> float:
    """mAP with the re-identification protocol from float64 distances, sorted:
    a query's own-camera items of its label dropped, queries with nothing to
    retrieve skipped."""
    gx, gy, gc = d["gx"].double(), d["gy"], d["gc"]
    aps = []
    for i in range(0, d["x"].shape[0], chunk):
        x, y, c = d["x"][i:i + chunk].double(), d["y"][i:i + chunk], d["c"][i:i + chunk]
        dist = torch.cdist(x, gx)
        junk = (gy[None] == y[:, None]) & (gc[None] == c[:, None])
        dist[junk] = float("inf")
        order = dist.argsort(dim=1)
        relevant = (gy[order] == y[:, None]) & ~junk.gather(1, order)
        precision = relevant.cumsum(1).double() / torch.arange(1, relevant.shape[1] + 1, device=x.device)
        r = relevant.sum(1)
        keep = r > 0
        aps.append((precision * relevant).sum(1)[keep] / r[keep])
    return float(torch.cat(aps).mean())


def timed(f: Callable[[], object], repeats: int) -> Dict[str, object]:
    value = f()  # warm-up
    seconds: List[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = f()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return dict(seconds=round(statistics.median(seconds), 3), runs=repeats, value=value)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=3368)
    p.add_argument("--gallery", type=int, default=15913)
    p.add_argument("--ids", type=int, default=751)
    p.add_argument("--cameras", type=int, default=6)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--spread", type=float, default=2.5, help="noise around the identity centres")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the results there as JSON")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    d = data(args)
    gallery = dict(ref_embeddings=d["gx"], ref_labels=d["gy"])
    cams = dict(gallery, cameras=d["c"], ref_cameras=d["gc"])
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(),
                device=args.device, commit=commit(), load_before=list(os.getloadavg()),
                queries=args.queries, gallery=args.gallery, ids=args.ids, cameras=args.cameras,
                dim=args.dim)
    runs = {
        "recall@{1,5,10}, cameras": lambda: recall_at_k(d["x"], d["y"], (1, 5, 10), **cams),
        "MAP@R, cameras": lambda: mean_average_precision_at_r(d["x"], d["y"], **cams),
        "mAP, cameras": lambda: mean_average_precision(d["x"], d["y"], **cams),
        "mAP, no cameras": lambda: mean_average_precision(d["x"], d["y"], **gallery),
        "retrieval_scores (rank-1/5/10, mAP, mINP), cameras, its mAP":
            lambda: retrieval_scores(d["x"], d["y"], (1, 5, 10), **cams).mean_average_precision,
        "torch float64 cdist + argsort mAP, cameras": lambda: torch_map(d),
    }
    results = {name: timed(f, args.repeats) for name, f in runs.items()}
    meta["load_after"] = list(os.getloadavg())
    ours, theirs = results["mAP, cameras"]["value"], results["torch float64 cdist + argsort mAP, cameras"]["value"]
    if abs(ours - theirs) > 1e-9:
        raise SystemExit(f"mAP disagrees with the torch computation: {ours} against {theirs}")
    together = results["retrieval_scores (rank-1/5/10, mAP, mINP), cameras, its mAP"]["value"]
    if together != ours:
        raise SystemExit(f"retrieval_scores' mAP {together} is not mean_average_precision's {ours}")

    loaded = max(meta["load_before"][0], meta["load_after"][0]) > (os.cpu_count() or 1)
    print(f"{args.queries} queries, {args.gallery} gallery items, D = {args.dim}, {args.ids} identities, "
          f"{args.cameras} cameras; {args.device}, {meta['threads']} threads, torch {meta['torch']}, "
          f"commit {meta['commit']}; load {meta['load_before'][0]:.2f} -> {meta['load_after'][0]:.2f}"
          + (" (ABOVE THE CORE COUNT: timings unreliable)" if loaded else ""))
    print("| measure | seconds (median) | value |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']} | {r['value']} |")
    if args.out:
        args.out.write_text(json.dumps(dict(meta=meta, loaded=loaded, results=results), indent=2))


if __name__ == "__main__":
    main()
