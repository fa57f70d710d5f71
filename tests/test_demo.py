"""The digits demo, end to end."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from online_triplet_loss import demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRICS = re.compile(
    r"^(raw pixels|before training|after training):\s+held-out recall@1 ([0-9.]+), MAP@R ([0-9.]+)$",
    re.M,
)


def test_module_runs_end_to_end(tmp_path):
    out = tmp_path / "figures"
    proc = subprocess.run(
        [sys.executable, "-m", "online_triplet_loss.demo", "--epochs", "2", "--loss", "semihard",
         "--out", str(out), "--seed", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    found = {name: (float(r1), float(m)) for name, r1, m in METRICS.findall(proc.stdout)}
    assert set(found) == {"raw pixels", "before training", "after training"}, proc.stdout
    for recall, map_at_r in found.values():
        assert 0 < recall <= 1 and 0 < map_at_r <= 1
    # two epochs already beat the untrained network on MAP@R
    assert found["after training"][1] > found["before training"][1] + 0.2, proc.stdout
    assert "epoch" in proc.stderr  # the tqdm bar
    figure = out / demo.FIGURE
    assert f"figure: {figure}" in proc.stdout
    assert figure.read_bytes()[:8] == PNG_MAGIC
    assert figure.stat().st_size > 20_000


def test_defaults_reach_the_target(tmp_path, capsys):
    """The default settings: held-out recall@1 >= 0.97 (seed 0)."""
    result = demo.run(demo.parse_args(["--out", str(tmp_path), "--no-progress"]))
    assert result.after["recall@1"] >= 0.97, result
    assert result.after["MAP@R"] >= 0.9, result
    assert result.before["MAP@R"] < 0.5
    assert len(result.losses) == 30 * 16
    printed = capsys.readouterr().out
    assert f"held-out recall@1 {result.after['recall@1']:.4f}" in printed
    assert (tmp_path / demo.FIGURE).exists()


def test_deterministic_for_a_seed(tmp_path):
    runs = [
        demo.run(demo.parse_args(["--epochs", "2", "--loss", loss, "--seed", "5",
                                  "--out", str(tmp_path), "--no-progress"]))
        for loss in ("all", "all", "hard")
    ]
    assert runs[0].losses == runs[1].losses
    assert runs[0].after == runs[1].after
    assert runs[0].losses != runs[2].losses


def test_leaves_torch_global_state_as_it_was(tmp_path):
    import torch

    torch.manual_seed(1234)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    demo.run(demo.parse_args(["--epochs", "1", "--threads", "1", "--out", str(tmp_path),
                              "--no-progress"]))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--loss", "triplet"], "invalid choice: 'triplet'"),
        (["--epochs", "0"], "must be a positive integer (>= 1), got '0'"),
        (["--margin", "-1"], "must be finite and >= 0, got '-1'"),
        (["--margin", "nan"], "must be finite and >= 0, got 'nan'"),
        (["--lr", "0"], "must be finite and > 0, got '0'"),
        (["--p", "11"], "the digits have 10 classes, got 11"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
