#!/usr/bin/env python
"""Benchmark harness: forward+backward time and peak memory of triplet losses.

Every (implementation, mining, B) cell runs in its own subprocess, so the peak
RSS of a cell is that cell's alone. Implementations:

- ``ours``:  this repository's ``online_triplet_loss.losses``.
- ``v006``:  online_triplet_loss 0.0.6 (dense B^3; batch-all and batch-hard only),
  its wheel taken from ``--wheels DIR`` (offline) or fetched with ``pip download``
  into ``benchmarks/.cache``, and loaded under the module name ``online_triplet_loss_v006``.
- ``pml``:   pytorch-metric-learning (a miner, then ``TripletMarginLoss`` on the
  mined indices; plain Euclidean distances, no normalisation).
- ``floor``: forward+backward of the B x B Euclidean distance matrix alone, both as
  ``torch.cdist`` and as ``sqrt(clamp(|a|^2 + |b|^2 - 2ab))``; the faster is the floor.
- ``st``:    sentence-transformers' ``BatchAllTripletLoss``, ``BatchHardTripletLoss``
  and ``BatchSemiHardTripletLoss`` on the embeddings alone (no model); only when
  asked for (``--impl``/``--cells``), not in the default grid.
- ``gemm``:  the bare product ``x @ x.T`` (B x B x D, no grad, no backward), whole
  and in row blocks written into one reused buffer; the faster is the yardstick
  every other cell is reported as a multiple of.

Every cell records the 1-minute load average around its runs and its thread
settings; a ratio involving a cell that ran under a load above the number of
CPUs is marked as such.

Run ``python benchmarks/run.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
V006_VERSION = "0.0.6"

IMPLS = ("ours", "v006", "pml", "floor", "gemm", "st")
MININGS = ("hard", "all", "semihard")
DEFAULT_SIZES = (128, 512, 1024, 2048, 4096, 8192, 16384)
FLOOR_VARIANTS = ("cdist", "expr")
GEMM_VARIANTS = ("full", "blocks")
VARIANTS = {"floor": FLOOR_VARIANTS, "gemm": GEMM_VARIANTS}
BASELINES = tuple(VARIANTS)  # no mining: one cell per B, shared by the minings
NO_MINING = "-"
# the gemm's row blocks hold about this many elements and at least this many
# rows, as the losses' chunks do (CHUNK_ELEMENTS, MIN_CHUNK_ROWS in losses.rs)
GEMM_BLOCK_ELEMENTS = 1 << 22
GEMM_MIN_ROWS = 512
# the whole B x B product is only formed up to this many bytes
GEMM_FULL_MAX_BYTES = 2 * 10 ** 9
# thread settings recorded with every cell
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")

OK = "ok"
OVER_TIME = "over time cap"
OVER_MEM = "over memory cap"
UNAVAILABLE = "unavailable"
ERROR = "error"
NOT_RUN = "not run"  # the total --budget was spent before the cell's turn

GB = 1e9


# --------------------------------------------------------------------------- child

def _vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _is_memory_error(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    msg = str(exc).lower()
    return any(s in msg for s in (
        "out of memory", "can't allocate memory", "cannot allocate memory",
        "defaultcpuallocator", "memory allocation", "failed to allocate",
        "capacity overflow",
    ))


def _build_step(spec: dict, torch):
    """Returns ``step(labels, x) -> loss`` doing the forward pass of the cell;
    a step that returns None has no backward pass (the gemm)."""
    impl, mining, margin = spec["impl"], spec["mining"], spec["margin"]
    if impl == "ours":
        from online_triplet_loss import losses as L
        fn = {"all": L.batch_all_triplet_loss, "hard": L.batch_hard_triplet_loss,
              "semihard": L.batch_semihard_triplet_loss}[mining]
        if mining == "all":
            return lambda y, x: fn(y, x, margin)[0]
        return lambda y, x: fn(y, x, margin)
    if impl == "st":
        from sentence_transformers.sentence_transformer import losses as st_losses
        cls = {"all": st_losses.BatchAllTripletLoss, "hard": st_losses.BatchHardTripletLoss,
               "semihard": st_losses.BatchSemiHardTripletLoss}[mining]
        loss_fn = cls(None, margin=margin)
        return lambda y, x: loss_fn.compute_loss_from_embeddings([x], y)
    if impl == "v006":
        import importlib.util
        s = importlib.util.spec_from_file_location("online_triplet_loss_v006", spec["v006_path"])
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
        if mining == "all":
            return lambda y, x: mod.batch_all_triplet_loss(y, x, margin)[0]
        return lambda y, x: mod.batch_hard_triplet_loss(y, x, margin)
    if impl == "pml":
        from pytorch_metric_learning import distances, losses, miners
        dist = distances.LpDistance(normalize_embeddings=False, p=2, power=1)
        if mining == "hard":
            miner = miners.BatchHardMiner(distance=dist)
        else:
            miner = miners.TripletMarginMiner(margin=margin, type_of_triplets=mining, distance=dist)
        loss_fn = losses.TripletMarginLoss(margin=margin, distance=dist)

        def step(y, x):
            return loss_fn(x, y, miner(x, y))
        return step
    if impl == "floor":
        if spec["variant"] == "cdist":
            return lambda y, x: torch.cdist(x, x).sum()

        def expr(y, x):
            sq = (x * x).sum(1)
            d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (x @ x.t())
            return d2.clamp_min(1e-12).sqrt().sum()
        return expr
    if impl == "gemm":
        if spec["variant"] == "full":
            def full(y, x):
                with torch.no_grad():
                    x @ x.t()
            return full
        B = spec["B"]
        rows = gemm_rows(B)
        buf = torch.empty(min(rows, B), B, device=spec["device"])

        def blocks(y, x):
            with torch.no_grad():
                xt = x.detach().t()
                for start in range(0, B, rows):
                    n = min(rows, B - start)
                    torch.mm(x.detach()[start:start + n], xt, out=buf[:n])
        return blocks
    raise ValueError(f"unknown implementation {impl!r}")


def child_main(spec_json: str, out_path: str) -> int:
    spec = json.loads(spec_json)
    res: dict = {"phase": "setup", "phase_t": time.time()}
    _write_json(out_path, res)

    def phase(name: str) -> None:
        res["phase"], res["phase_t"] = name, time.time()
        _write_json(out_path, res)

    def finish(status: str, detail: str = "") -> int:
        res["status"], res["detail"] = status, detail
        res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if cuda:
            res["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        phase("done")
        return 0

    cuda = False
    try:
        import torch
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        res["torch_threads"] = torch.get_num_threads()
        res["thread_env"] = {k: os.environ.get(k) for k in THREAD_ENV}
        device = torch.device(spec["device"])
        cuda = device.type == "cuda"
        if cuda and device.index is None:  # set_per_process_memory_fraction needs the index
            device = torch.device("cuda", torch.cuda.current_device())
        step = _build_step(spec, torch)
        B, D, K = spec["B"], spec["D"], spec["K"]
        from pk_batch import pk_batch  # beside this script, which runs the cell
        labels, x = pk_batch(B, K, D, spec.get("seed", 0), device,
                             shuffled=spec.get("labels", "shuffled") == "shuffled")
        x.requires_grad_()
    except Exception as exc:  # import or setup failure: not a cap
        res["error"] = f"{type(exc).__name__}: {exc}"
        return finish(ERROR, res["error"][:200])

    cap = spec["mem_cap_bytes"]
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
        torch.cuda.reset_peak_memory_stats(device)
    elif cap and spec.get("rlimit", True):
        # the cap bounds what the cell adds on top of imports and inputs
        limit = _vm_size_bytes() + int(cap)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or limit < hard:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
            res["rlimit_as_bytes"] = limit
    res["rss_baseline_bytes"] = _rss_bytes()

    def once() -> float:
        x.grad = None
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step(labels, x)
        if loss is not None:
            loss.backward()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if loss is not None:
            res["loss"] = float(loss.detach())
        return dt

    time_cap = spec["time_cap"]
    res["loadavg_before"] = list(os.getloadavg())
    try:
        phase("warmup")
        w = once()
        res["warmup_s"] = w
        if w > time_cap:
            res["single_run_s"] = w
            return finish(OVER_TIME, f"single run {w:.1f} s > cap {time_cap:g} s")
        # fewer runs for slow cells: the timed runs stay within the time cap.
        # Their number comes from the first timed run, not the warm-up, which
        # carries one-off costs (CUDA's first semi-hard or batch-all call took 3 s
        # on an H200, most likely loading kernel modules lazily).
        phase("timed")
        times = [once()]
        n = max(1, min(spec["repeats"], int(time_cap // max(times[0], 1e-9))))
        for _ in range(n - 1):
            times.append(once())
        res["times_s"] = times
        res["median_s"] = statistics.median(times)
        res["loadavg_after"] = list(os.getloadavg())
        return finish(OK)
    except BaseException as exc:  # noqa: BLE001 - a Rust panic is a BaseException
        if isinstance(exc, KeyboardInterrupt):
            raise
        res["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        if _is_memory_error(exc):
            return finish(OVER_MEM, res["error"][:200])
        return finish(ERROR, res["error"][:200])


# -------------------------------------------------------------------------- parent

def valid_triplets(B: int, K: int) -> int:
    return B * (K - 1) * (B - K)


def gemm_rows(B: int) -> int:
    """Rows per block of the gemm yardstick: the losses' chunk policy."""
    return min(B, max(GEMM_BLOCK_ELEMENTS // B, GEMM_MIN_ROWS))


def estimate_memory(impl: str, mining: str, B: int, K: int, D: int = 128) -> int:
    """Rough peak bytes on top of the baseline; only used to skip hopeless cells."""
    if impl == "ours":  # chunks of 2^22 distances, the gradients, O(B·D) besides
        return 2 ** 28 + 64 * B * D
    if impl == "gemm":
        return 4 * gemm_rows(B) * B + 8 * B * D
    if impl == "v006" and mining == "all":
        return 20 * B ** 3  # about five float32 B^3 tensors
    if impl == "pml" and mining in ("all", "semihard"):
        dense = B ** 3 if B ** 3 < 2 ** 31 - 1 else 0  # uint8 B^3 mask before torch.where
        return dense + 100 * valid_triplets(B, K)  # int64 indices, gathers, their grads
    if impl == "floor":
        return 16 * B * B  # the float32 B x B distances, their gradient and two temporaries
    if impl == "st" and mining == "all":
        return 32 * B * B * (K - 1)  # sentence-transformers 6.2: (B(K-1), B) rows, ~34 bytes each measured
    if impl == "st" and mining == "semihard":
        return 96 * B * B  # sentence-transformers 6.2: sorts and gathers of B x B, ~100 bytes each measured
    return 40 * B * B  # a few float32 B x B matrices and their grads


# exponent used to extrapolate time from the largest smaller B measured
TIME_EXPONENT = {("v006", "all"): 3}


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "—"
    if b >= 1e9:
        return f"{b / 1e9:.2f} GB"
    return f"{b / 1e6:.0f} MB"


def ensure_v006(wheels_dir: Optional[Path] = None) -> Tuple[Optional[str], str]:
    """Path of 0.0.6's losses.py, from its wheel in ``wheels_dir`` (never the
    network) or else fetching it once; or (None, reason)."""
    target = CACHE / f"v{V006_VERSION}" / "online_triplet_loss" / "losses.py"
    pattern = f"online_triplet_loss-{V006_VERSION}-*.whl"
    if wheels_dir is not None:
        wheels = sorted(Path(wheels_dir).glob(pattern))
        if not wheels:
            return None, f"no {pattern} in {wheels_dir}"
    elif target.exists():
        return str(target), ""
    else:
        CACHE.mkdir(parents=True, exist_ok=True)
        wheels = sorted(CACHE.glob(pattern))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"online_triplet_loss=={V006_VERSION}", "-d", str(CACHE)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(CACHE.glob(f"online_triplet_loss-{V006_VERSION}-*.whl"))
        if not wheels:
            return None, f"pip download failed: {(p.stderr or p.stdout).strip()[-200:]}"
    with zipfile.ZipFile(wheels[0]) as z:
        data = z.read("online_triplet_loss/losses.py")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return str(target), ""


def run_child(spec: dict, time_cap: float, setup_timeout: float = 180.0) -> dict:
    """Runs one cell in a subprocess; kills it when a phase overruns the time cap."""
    fd, out_path = tempfile.mkstemp(prefix="otl-bench-", suffix=".json")
    os.close(fd)
    os.unlink(out_path)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", json.dumps(spec), out_path]
    start = time.time()
    # stderr to a file, not a pipe: a chatty child (a Rust backtrace) must not block
    errf = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf,
                            start_new_session=True)
    killed = None
    res: dict = {}
    while True:
        try:
            proc.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        try:
            with open(out_path) as f:
                res = json.load(f)
        except (OSError, ValueError):
            pass
        ph, since = res.get("phase", "setup"), time.time() - res.get("phase_t", start)
        if ph == "warmup" and since > time_cap + 1.0:
            killed = f"single run > {time_cap:g} s (killed)"
        elif ph == "timed" and since > 2 * time_cap + 10.0:
            killed = f"timed runs > {2 * time_cap:g} s (killed)"
        elif ph == "setup" and since > setup_timeout:
            killed = f"setup > {setup_timeout:g} s (killed)"
        if killed:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            break
    errf.seek(0)
    err = errf.read().decode(errors="replace")
    errf.close()
    try:
        with open(out_path) as f:
            res = json.load(f)
    except (OSError, ValueError):
        pass
    for p in (out_path, out_path + ".tmp"):
        if os.path.exists(p):
            os.unlink(p)
    res["wall_s"] = time.time() - start
    mem_msg = any(m in err.lower() for m in ("can't allocate memory", "memory allocation of", "out of memory"))
    if killed:
        res["status"] = ERROR if killed.startswith("setup") else OVER_TIME
        res["detail"] = killed
        if mem_msg and res["status"] == OVER_TIME:  # e.g. hung after a failed allocation
            res["status"] = OVER_MEM
            res["detail"] = killed + " after a failed allocation"
    elif "status" not in res:
        rc = proc.returncode
        tail = err.strip()[-300:]
        sig = -rc if rc < 0 else None
        oom_like = sig == signal.SIGKILL or (sig in (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS)
                                             and res.get("phase") in ("warmup", "timed")
                                             and ("rlimit_as_bytes" in res or mem_msg))
        if oom_like:
            res["status"] = OVER_MEM
            res["detail"] = f"child died with {signal.Signals(sig).name} in {res.get('phase')} (memory cap / OOM)"
        else:
            res["status"] = ERROR
            res["detail"] = f"exit {rc}: {tail}"
    for k in ("phase", "phase_t"):
        res.pop(k, None)
    return res


def plan_cells(impls: List[str], minings: List[str], sizes: List[int],
               explicit: Optional[List[Tuple[str, str, int]]]) -> List[Tuple[str, str, int]]:
    cells: List[Tuple[str, str, int]] = []
    if explicit is not None:
        for impl, mining, B in explicit:
            if impl in BASELINES:
                mining = NO_MINING
            c = (impl, mining, B)
            if c not in cells:
                cells.append(c)
    else:
        for impl in impls:
            for mining in ([NO_MINING] if impl in BASELINES else minings):
                if impl == "v006" and mining == "semihard":
                    continue  # 0.0.6 has no semi-hard loss
                for B in sizes:
                    c = (impl, mining, B)
                    if c not in cells:
                        cells.append(c)
    # series by series, ascending B, so that a larger B can be skipped on evidence
    order = {c: i for i, c in enumerate(cells)}
    first = {}
    for c in cells:
        first.setdefault(c[:2], order[c])
    return sorted(cells, key=lambda c: (first[c[:2]], c[2]))


def parse_cells(text: str) -> List[Tuple[str, str, int]]:
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.split(":")
        if len(parts) != 3:
            raise SystemExit(f"--cells: expected impl:mining:B, got {item!r}")
        impl, mining, B = parts[0], parts[1] or NO_MINING, int(parts[2])
        if impl not in IMPLS:
            raise SystemExit(f"--cells: unknown implementation {impl!r}")
        if impl not in BASELINES and mining not in MININGS:
            raise SystemExit(f"--cells: unknown mining {mining!r}")
        if impl == "v006" and mining == "semihard":
            raise SystemExit("--cells: v006 (0.0.6) has no semi-hard loss")
        out.append((impl, mining, B))
    return out


def run_cell(impl: str, mining: str, B: int, args, base: dict, series: Dict, v006: Tuple) -> dict:
    cell = {"impl": impl, "mining": mining, "B": B, "D": args.dim, "K": args.k, "P": B // args.k}
    est = estimate_memory(impl, mining, B, args.k, args.dim)
    cell["est_mem_bytes"] = est
    prev = series.get((impl, mining))  # largest smaller B already run in this series
    if impl == "v006" and v006[0] is None:
        cell.update(status=UNAVAILABLE, detail=v006[1])
        return cell
    if impl == "pml" and not base["pml_available"]:
        cell.update(status=UNAVAILABLE, detail="pytorch-metric-learning is not installed")
        return cell
    if prev and prev["status"] in (OVER_TIME, OVER_MEM):
        cell.update(status=prev["status"], estimated=True,
                    detail=f"skipped: B={prev['B']} was already {prev['status']}")
        return cell
    if est > args.mem_cap_gb * GB:
        cell.update(status=OVER_MEM, estimated=True,
                    detail=f"skipped: estimated {fmt_bytes(est)} > cap {args.mem_cap_gb:g} GB")
        return cell
    if prev and prev["status"] == OK:
        e = TIME_EXPONENT.get((impl, mining), 2)
        guess = prev["median_s"] * (B / prev["B"]) ** e
        if guess > args.time_cap:
            cell.update(status=OVER_TIME, estimated=True, est_time_s=guess,
                        detail=f"skipped: estimated {fmt_time(guess)} from B={prev['B']} > cap {args.time_cap:g} s")
            return cell
    spec = dict(base["spec"], impl=impl, mining=mining, B=B, v006_path=v006[0])
    if impl in VARIANTS:
        variants = {}
        for v in VARIANTS[impl]:
            if impl == "gemm" and v == "full" and 4 * B * B > GEMM_FULL_MAX_BYTES:
                variants[v] = {"status": OVER_MEM, "estimated": True,
                               "detail": f"skipped: the B×B product takes {fmt_bytes(4 * B * B)}"}
                continue
            variants[v] = run_child(dict(spec, variant=v), args.time_cap)
        ok = {v: r for v, r in variants.items() if r.get("status") == OK}
        if ok:
            best = min(ok, key=lambda v: ok[v]["median_s"])
            cell.update(variants[best], variant=best)
        else:
            best = VARIANTS[impl][0]
            cell.update(variants[best], variant=None)
        cell["variants"] = {v: {k: r.get(k) for k in ("status", "median_s", "peak_rss_bytes", "cuda_peak_bytes",
                                                      "detail", "loadavg_before", "loadavg_after")}
                            for v, r in variants.items()}
    else:
        cell.update(run_child(spec, args.time_cap))
    mark_load(cell, base["cpus"])
    return cell


def mark_load(cell: dict, cpus: int) -> None:
    """Records the highest 1-minute load average seen around the cell's runs
    and whether it exceeded the number of CPUs (then the cell's timing is not
    a measurement of the code alone)."""
    loads = [cell[k][0] for k in ("loadavg_before", "loadavg_after") if cell.get(k)]
    if loads:
        cell["load_1m"] = max(loads)
        cell["loaded"] = cell["load_1m"] > cpus


def load_mark(*cells: Optional[dict]) -> str:
    """` ⚠ load L` when one of the cells ran under a load above the CPU count."""
    loads = [c["load_1m"] for c in cells if c and c.get("loaded")]
    return f" ⚠ load {max(loads):.1f}" if loads else ""


def ratio_text(num: Optional[dict], den: Optional[dict], speedup: bool, time_cap: float) -> str:
    """``speedup``: other / ours (how many times faster ours is); else ours / other."""
    if num is None or den is None:
        return "—"
    a, b = (num, den)
    if a.get("status") == OK and b.get("status") == OK:
        return f"{a['median_s'] / b['median_s']:.3g}×" + load_mark(a, b)
    if speedup and b.get("status") == OK and a.get("status") == OVER_TIME:
        if a.get("single_run_s"):
            return f"≈{a['single_run_s'] / b['median_s']:.3g}× (1 run)"
        if not a.get("estimated"):
            return f"> {time_cap / b['median_s']:.3g}×"
        if a.get("est_time_s"):
            return f"≈{a['est_time_s'] / b['median_s']:.3g}× (est.)"
    if a.get("status") != OK:
        return f"— ({a.get('status')})"
    return f"— ({b.get('status')})"


def cell_time_text(c: dict, time_cap: float) -> str:
    st = c.get("status")
    if st == OK:
        return fmt_time(c["median_s"])
    if st == OVER_TIME:
        if c.get("single_run_s"):
            return f"> cap ({fmt_time(c['single_run_s'])}, 1 run)"
        return f"> cap ({time_cap:g} s)"
    return "—"


def write_outputs(cells: List[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.json", "w") as f:
        json.dump({"meta": meta, "cells": cells}, f, indent=1)

    cuda = meta["device"] == "cuda"
    time_cap = meta["time_cap_s"]
    by_key = {(c["impl"], c["mining"], c["B"]): c for c in cells}
    floor_at = {c["B"]: c for c in cells if c["impl"] == "floor"}
    gemm_at = {c["B"]: c for c in cells if c["impl"] == "gemm"}

    head = ["implementation", "mining", "B", "median time", "× gemm", "runs", "peak RSS"]
    if cuda:
        head.append("peak CUDA mem")
    head += ["load (1 min)", "threads", "status", "ours vs v006", "ours vs pml", "ours / floor"]
    lines = [
        "# Triplet-loss benchmark",
        "",
        f"- {meta['date']}, device **{meta['device_name']}**, torch {meta['torch']}, "
        f"{meta['threads']} CPU threads, pytorch-metric-learning {meta['pml'] or 'n/a'}, commit {meta['commit']}"
        f" (tree), online_triplet_loss {meta.get('package') or 'n/a'}",
        f"- D={meta['D']}, K={meta['K']} per class (P = B/K classes, labels {meta['labels']}), margin {meta['margin']}, "
        f"embeddings randn/sqrt(D), forward+backward, median of up to {meta['repeats']} runs after a warm-up",
        f"- caps: {time_cap:g} s per run, {meta['mem_cap_gb']:g} GB per cell"
        + (f", {meta['budget_s']:g} s in all" if meta.get("budget_s") else "") + "; "
        f"load average at start {meta['loadavg_start'][0]:.2f}"
        + (f", at end {meta['loadavg_end'][0]:.2f}" if "loadavg_end" in meta else "")
        + f" on {meta['cpus']} CPUs; thread environment: "
        + (", ".join(f"`{k}={v}`" for k, v in meta.get("env", {}).items()) or "none set"),
        "- *× gemm* = the cell's time / that of one bare `x @ x.T` (B×B×D, no grad, same device and "
        "threads) at the same B: the product every loss needs at least once",
        "- ratios are on `ours` rows: *vs v006* and *vs pml* = their time / ours (× faster); "
        "*ours / floor* = ours / the distance-matrix floor at the same B",
        f"- *load (1 min)*: the highest 1-minute load average seen before and after the cell's runs; "
        f"**⚠ marks a ratio with a cell measured under a load above the {meta['cpus']} CPUs: "
        f"it is not a measurement of the code alone**",
    ]
    if meta.get("jobs", 1) > 1:
        lines.append(f"- **{meta['jobs']} series ran in parallel: timings and memory are not comparable**")
    variants = sorted({(B, c.get("variant")) for B, c in floor_at.items() if c.get("variant")})
    if variants:
        lines.append("- floor = the faster of `torch.cdist` and `sqrt(clamp(|a|²+|b|²-2ab))`: "
                     + ", ".join(f"B={B}: {v}" for B, v in variants))
    variants = sorted({(B, c.get("variant")) for B, c in gemm_at.items() if c.get("variant")})
    if variants:
        lines.append(f"- gemm = the faster of the whole product and row blocks of {GEMM_BLOCK_ELEMENTS} "
                     f"elements, at least {GEMM_MIN_ROWS} rows, into one buffer: " + ", ".join(f"B={B}: {v}" for B, v in variants))
    loaded = [c for c in cells if c.get("loaded")]
    if loaded:
        lines.append(f"- **{len(loaded)} of {len(cells)} cells ran under a 1-minute load above "
                     f"{meta['cpus']}: their times and ratios (⚠) are not valid measurements**")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        impl, mining, B = c["impl"], c["mining"], c["B"]
        mining_txt = f"— ({c['variant']})" if impl in BASELINES and c.get("variant") else mining
        st = c.get("status", "")
        if c.get("estimated"):
            st += " (est.)"
        if c.get("detail") and c.get("status") != OK:
            st += f": {c['detail']}"
        row = [impl, mining_txt, str(B), cell_time_text(c, time_cap),
               "" if impl == "gemm" else ratio_text(c, gemm_at.get(B), False, time_cap),
               str(len(c.get("times_s", []))) if c.get("status") == OK else "—",
               fmt_bytes(c.get("peak_rss_bytes"))]
        if cuda:
            row.append(fmt_bytes(c.get("cuda_peak_bytes")))
        env = c.get("thread_env") or {}
        row += [f"{c['load_1m']:.2f}" + (" ⚠" if c.get("loaded") else "") if "load_1m" in c else "—",
                f"{c.get('torch_threads', '—')} ({env.get('OMP_WAIT_POLICY') or 'default'} wait)",
                st.replace("|", "\\|")]
        if impl == "ours":
            row += [ratio_text(by_key.get(("v006", mining, B)), c, True, time_cap),
                    ratio_text(by_key.get(("pml", mining, B)), c, True, time_cap),
                    ratio_text(c, floor_at.get(B), False, time_cap)]
        else:
            row += ["", "", ""]
        lines.append("| " + " | ".join(row) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ours": "tab:blue", "v006": "tab:red", "pml": "tab:green", "floor": "black",
              "gemm": "tab:gray", "st": "tab:purple"}
    styles = {"all": "-", "hard": "--", "semihard": ":", NO_MINING: "-."}
    markers = {"all": "o", "hard": "s", "semihard": "^", NO_MINING: "x"}
    fig, (ax_t, ax_r, ax_m) = plt.subplots(1, 3, figsize=(19, 5))
    series: Dict[Tuple[str, str], List[dict]] = {}
    for c in cells:
        series.setdefault((c["impl"], c["mining"]), []).append(c)
    mem_key = "cuda_peak_bytes" if cuda else "peak_rss_bytes"
    plotted = 0
    for (impl, mining), cs in series.items():
        ok = sorted((c for c in cs if c.get("status") == OK), key=lambda c: c["B"])
        if not ok:
            continue
        plotted += 1
        label = {"floor": "floor (distance matrix)", "gemm": "gemm (x @ x.T)"}.get(impl, f"{impl} {mining}")
        kw = dict(color=colors.get(impl), linestyle=styles.get(mining, "-"),
                  marker=markers.get(mining, "o"), label=label)
        xs = [c["B"] for c in ok]
        ax_t.plot(xs, [c["median_s"] for c in ok], **kw)
        ax_m.plot(xs, [c.get(mem_key, float("nan")) / 1e9 for c in ok], **kw)
        rel = [(c["B"], c["median_s"] / gemm_at[c["B"]]["median_s"]) for c in ok
               if gemm_at.get(c["B"], {}).get("status") == OK]
        if rel:
            ax_r.plot(*zip(*rel), **kw)
            for B, r in rel:
                if by_key[(impl, mining, B)].get("loaded") or gemm_at[B].get("loaded"):
                    ax_r.annotate("under load", (B, r), fontsize=7, color="tab:red")
    for ax, ylabel in ((ax_t, "forward+backward time (s)"),
                       (ax_r, "time / one x @ x.T (gemm)"),
                       (ax_m, "peak CUDA memory (GB)" if cuda else "peak RSS (GB)")):
        ax.set_xlabel("batch size B")
        ax.set_ylabel(ylabel)
        if plotted:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            sizes = sorted({c["B"] for c in cells if c.get("status") == OK})
            ax.set_xticks(sizes, [str(b) for b in sizes])
            ax.grid(True, which="both", alpha=0.3)
        else:
            ax.text(0.5, 0.5, "no cell measured", ha="center", va="center", transform=ax.transAxes)
    if plotted:
        ax_t.legend(fontsize=8)
    fig.suptitle(f"triplet losses, D={meta['D']}, K={meta['K']}, {meta['device_name']}")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)
    plt.close(fig)


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _csv(text: str, allowed) -> List[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    for t in items:
        if t not in allowed:
            raise SystemExit(f"unknown value {t!r}; choose from {', '.join(allowed)}")
    return items


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--impl", default="ours,v006,pml,floor,gemm", help="comma list of " + ", ".join(IMPLS))
    ap.add_argument("--mining", default=",".join(MININGS), help="comma list of " + ", ".join(MININGS))
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="comma list of batch sizes B")
    ap.add_argument("--cells", default=None,
                    help="explicit cells impl:mining:B, comma separated (overrides --impl/--mining/--sizes); "
                         "e.g. ours:all:512,v006:all:512,floor::4096")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per cell (fewer when slow)")
    ap.add_argument("--time-cap", type=float, default=60.0, help="seconds; a single run over it is reported '> cap'")
    ap.add_argument("--mem-cap-gb", type=float, default=20.0, help="memory cap per cell (GB)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    ap.add_argument("--dim", type=int, default=128, help="embedding dimension D")
    ap.add_argument("--k", type=int, default=8, help="samples per class K (P = B/K classes)")
    ap.add_argument("--margin", type=float, default=0.2)
    ap.add_argument("--labels", choices=("shuffled", "grouped"), default="shuffled",
                    help="order of the P×K labels in the batch")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="series (impl×mining) run in parallel; >1 disturbs timings, for smoke tests only")
    ap.add_argument("--out", default=str(HERE / "results"), help="output directory")
    ap.add_argument("--wheels", default=None,
                    help="folder holding the online_triplet_loss 0.0.6 wheel (offline); "
                         "default: pip download it into benchmarks/.cache")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="seconds; no cell starts after this (they are reported 'not run'); 0: no limit")
    args = ap.parse_args(argv)

    explicit = parse_cells(args.cells) if args.cells else None
    impls, minings = _csv(args.impl, IMPLS), _csv(args.mining, MININGS)
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    for B in sizes + [c[2] for c in (explicit or [])]:
        if B % args.k or B < 2 * args.k:
            raise SystemExit(f"B={B} must be a multiple of K={args.k} with at least 2 classes")

    import torch
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_type = torch.device(device).type
    device_name = torch.cuda.get_device_name(torch.device(device)) if dev_type == "cuda" else _cpu_name()
    try:
        from importlib.metadata import version
        pml_version: Optional[str] = version("pytorch-metric-learning")
    except Exception:
        pml_version = None
    try:  # the package the cells import, which need not be the tree's build
        from importlib.metadata import version
        package: Optional[str] = version("online_triplet_loss")
    except Exception:
        package = None

    cells_plan = plan_cells(impls, minings, sizes, explicit)
    v006 = (ensure_v006(Path(args.wheels) if args.wheels else None)
            if any(c[0] == "v006" for c in cells_plan) else (None, "not requested"))
    base = {
        "cpus": os.cpu_count() or 1,
        "pml_available": pml_version is not None,
        "spec": {"device": device, "D": args.dim, "K": args.k, "margin": args.margin,
                 "repeats": args.repeats, "time_cap": args.time_cap, "labels": args.labels,
                 "mem_cap_bytes": int(args.mem_cap_gb * GB), "threads": args.threads},
    }
    meta = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": dev_type, "device_name": device_name, "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(), "pml": pml_version,
        "commit": _commit(), "package": package, "python": platform.python_version(),
        "D": args.dim, "K": args.k, "margin": args.margin, "labels": args.labels,
        "repeats": args.repeats, "jobs": args.jobs, "time_cap_s": args.time_cap, "mem_cap_gb": args.mem_cap_gb,
        "budget_s": args.budget or None,
        "argv": sys.argv[1:] if argv is None else argv,
        "loadavg_start": list(os.getloadavg()), "cpus": os.cpu_count(),
        # thread settings that the cells inherit and that move timings
        "env": {k: v for k, v in sorted(os.environ.items())
                if k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_", "RAYON_", "OPENBLAS_"))},
    }
    out = Path(args.out)
    started = time.time()
    lock = threading.Lock()
    done: Dict[Tuple[str, str, int], dict] = {}

    def run_series(cells: List[Tuple[str, str, int]]) -> None:
        series: Dict[Tuple[str, str], dict] = {}
        for impl, mining, B in cells:
            t0 = time.time()
            if args.budget and t0 - started > args.budget:
                c = {"impl": impl, "mining": mining, "B": B, "status": NOT_RUN,
                     "detail": f"total budget of {args.budget:g} s spent"}
            else:
                c = run_cell(impl, mining, B, args, base, series, v006)
            if c.get("status") in (OK, OVER_TIME, OVER_MEM):
                series[(impl, mining)] = c
            with lock:
                done[(impl, mining, B)] = c
                print(f"{impl:5s} {mining:8s} B={B:<6d} {c.get('status'):16s} "
                      f"{cell_time_text(c, args.time_cap):>22s}  peak RSS {fmt_bytes(c.get('peak_rss_bytes')):>8s}"
                      + (f"  CUDA {fmt_bytes(c.get('cuda_peak_bytes'))}" if dev_type == "cuda" else "")
                      + (f"  [{c['detail']}]" if c.get("detail") and c.get("status") != OK else "")
                      + f"  ({time.time() - t0:.1f} s)", flush=True)
                # keep partial results if interrupted
                write_outputs([done[k] for k in cells_plan if k in done], meta, out)

    groups: Dict[Tuple[str, str], List[Tuple[str, str, int]]] = {}
    for c in cells_plan:
        groups.setdefault(c[:2], []).append(c)
    if args.jobs > 1:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(args.jobs) as pool:
            for f in [pool.submit(run_series, g) for g in groups.values()]:
                f.result()
    else:
        for g in groups.values():
            run_series(g)
    results = [done[k] for k in cells_plan]
    meta["loadavg_end"] = list(os.getloadavg())
    write_outputs(results, meta, out)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "_child":
        sys.exit(child_main(sys.argv[2], sys.argv[3]))
    sys.exit(main())
