"""Smoke test of benchmarks/run.py: tiny sizes, every implementation and mining."""

import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"

# 0.0.6 has no semi-hard loss; the floor and the gemm do no mining ("-")
EXPECTED = {
    ("ours", "hard"), ("ours", "all"), ("ours", "semihard"),
    ("v006", "hard"), ("v006", "all"),
    ("pml", "hard"), ("pml", "all"), ("pml", "semihard"),
    ("floor", "-"), ("gemm", "-"),
}


def _run(out, *args, timeout=120):
    cmd = [sys.executable, str(RUN), "--device", "cpu", "--out", str(out), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    for name in ("results.md", "results.json", "results.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    return data, (out / "results.md").read_text(), p.stdout


# 0.0.6 comes from the wheel the parity tests download (conftest: a failed
# download fails them), and pytorch-metric-learning is in requirements-dev.txt:
# every cell must run.
def test_every_cell_is_reported(tmp_path, wheel_006):
    data, md, log = _run(tmp_path, "--sizes", "64", "--repeats", "1", "--jobs", "3",
                         "--wheels", str(wheel_006.parent))
    cells = {(c["impl"], c["mining"], c["B"]): c for c in data["cells"]}
    assert set(cells) == {(i, m, 64) for i, m in EXPECTED}, log
    for (impl, mining, _), c in cells.items():
        assert c["status"] == "ok", (impl, mining, c)
        assert c["median_s"] > 0 and len(c["times_s"]) == 1
        assert c["peak_rss_bytes"] > 0
        assert c["torch_threads"] >= 1 and "OMP_WAIT_POLICY" in c["thread_env"]
        assert c["load_1m"] >= 0 and isinstance(c["loaded"], bool)
        if impl != "gemm":  # the gemm has no loss and no backward
            assert c["loss"] == c["loss"]  # not NaN
    assert cells[("floor", "-", 64)]["variant"] in ("cdist", "expr")
    assert cells[("gemm", "-", 64)]["variant"] in ("full", "blocks")
    rows = [l for l in md.splitlines() if l.startswith("| ") and not l.startswith("| implementation")]
    assert len(rows) == len(EXPECTED)
    for impl, mining in EXPECTED:
        shown = mining if impl not in ("floor", "gemm") else "— ("
        assert any(r.startswith(f"| {impl} | {shown}") and "| 64 |" in r for r in rows), (impl, mining, md)


def test_capped_cells_are_reported_not_dropped(tmp_path, wheel_006):
    cells_arg = "v006:all:64,v006:all:128,pml:all:4096"
    data, md, log = _run(tmp_path, "--cells", cells_arg, "--repeats", "1",
                         "--time-cap", "1e-6", "--mem-cap-gb", "1", "--wheels", str(wheel_006.parent))
    cells = {(c["impl"], c["mining"], c["B"]): c for c in data["cells"]}
    assert set(cells) == {("v006", "all", 64), ("v006", "all", 128), ("pml", "all", 4096)}, log
    assert cells[("v006", "all", 64)]["status"] == "over time cap"
    assert cells[("v006", "all", 64)]["single_run_s"] > 0
    assert cells[("v006", "all", 128)]["status"] == "over time cap"  # larger B: skipped on evidence
    assert cells[("pml", "all", 4096)]["status"] == "over memory cap"  # estimated > 1 GB
    assert md.count("over time cap") >= 2 and "over memory cap" in md


def test_ratios_under_load_are_marked(tmp_path):
    """A cell whose recorded load exceeds the CPU count gets ⚠ on its ratios."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    quiet = {"status": "ok", "median_s": 2.0, "loadavg_before": [0.5, 0, 0], "loadavg_after": [1.0, 0, 0]}
    busy = dict(quiet, median_s=1.0, loadavg_after=[5.0, 0, 0])
    for c in (quiet, busy):
        run.mark_load(c, 2)
    assert quiet["load_1m"] == 1.0 and not quiet["loaded"]
    assert busy["load_1m"] == 5.0 and busy["loaded"]
    assert run.ratio_text(quiet, dict(quiet, median_s=1.0), False, 60) == "2×"
    assert run.ratio_text(quiet, busy, False, 60) == "2× ⚠ load 5.0"


def test_chunk_size_sweep_times_every_mining_and_chunk(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "chunk_sizes.py"), "--device", "cpu", "--out", str(tmp_path),
           "--sizes", "64", "--chunks", "16,128", "--repeats", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads((tmp_path / "chunk_sizes.json").read_text())["rows"]
    # the gemm, then each mining at the default, 16 and the whole batch (128 > B is left out)
    expected = [(64, "gemm", "-")] + [(64, m, c) for m in ("hard", "semihard", "all") for c in ("default", 16, 64)]
    assert [(r["B"], r["mining"], r["chunk"]) for r in rows] == expected
    assert all(r["status"] == "ok" and r["median_s"] > 0 for r in rows), rows
    assert (tmp_path / "chunk_sizes.md").read_text().count("\n| 64 |") == len(expected)


def test_profile_lists_the_operators_of_every_mining(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_losses.py"), "--device", "cpu", "--out", str(tmp_path),
           "--sizes", "64", "--runs", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    text = (tmp_path / "profile.txt").read_text()
    for mining in ("hard", "semihard", "all"):
        section = text.split(f"## B=64 {mining}:")[1].split("## ")[0]
        assert "ms per run" in section and "aten::" in section, (mining, section[:500])


def test_semihard_variants_agree_and_are_timed():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "semihard_variants.py"), "--device", "cpu",
           "--sizes", "64,200", "--rows", "32", "--repeats", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [line for line in p.stdout.splitlines() if line.startswith(("| 64 ", "| 200 "))]
    assert len(rows) == 2 and all(r.endswith("| yes |") for r in rows), p.stdout


def test_metrics_benchmark_agrees_with_torch_and_records_the_machine(tmp_path):
    """benchmarks/metrics.py at a small scale: every measure timed, our mAP
    equal to a plain float64 torch computation (the script exits non-zero
    otherwise), the load and threads recorded."""
    out = tmp_path / "metrics.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "metrics.py"), "--queries", "150", "--gallery", "600",
           "--ids", "40", "--dim", "16", "--repeats", "1", "--threads", "1", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(out.read_text())
    assert len(data["results"]) == 6 and data["meta"]["threads"] == 1
    assert len(data["meta"]["load_before"]) == 3
    results = data["results"]
    recall = results["recall@{1,5,10}, cameras"]["value"]
    assert 0 < recall["1"] <= recall["5"] <= recall["10"] <= 1
    ours, theirs = results["mAP, cameras"]["value"], results["torch float64 cdist + argsort mAP, cameras"]["value"]
    assert abs(ours - theirs) < 1e-9
    assert results["retrieval_scores (rank-1/5/10, mAP, mINP), cameras, its mAP"]["value"] == ours
    assert "| mAP, cameras |" in p.stdout


def test_memory_bank_benchmark_times_every_way_mining_and_distance():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "memory_bank.py"), "--anchors", "32",
           "--memory", "200", "--dim", "16", "--classes", "20", "--repeats", "1", "--threads", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 threads" in p.stdout and "gemm x @ memory.T:" in p.stdout
    rows = [line.split(" | ")[:3] for line in p.stdout.splitlines()
            if line.startswith(("| refs ", "| cat ", "| parts ", "| xbm "))]
    assert sorted(rows) == sorted([f"| {w}", m, d] for w in ("refs", "cat", "parts", "xbm")
                                  for m in ("hard", "all", "semihard")
                                  for d in ("euclidean", "cosine")), p.stdout
