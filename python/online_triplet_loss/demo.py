r"""Demo: learn an embedding of handwritten digits with online triplet mining.

Trains a small MLP on scikit-learn's bundled 8×8 digits (no download) with
P×K batches from :class:`~online_triplet_loss.PKSampler`, reports held-out
recall@1 and MAP@R before and after training, and writes a figure with the
held-out embeddings projected to 2-D by PCA beside the loss curve::

    python -m online_triplet_loss.demo --loss hard --epochs 30 --out demo-out

The defaults (batch-hard, margin 0.2 on L2-normalised 32-d embeddings, a
64-256-256-32 MLP, Adam with a one-cycle schedule peaking at 3e-3, 30 epochs
of 16 batches of 10 classes × 8 digits, one torch thread) reach held-out
recall@1 of about 0.98 and MAP@R of about 0.96 in a few seconds on two CPU
cores; 1-NN on the raw pixels reaches a similar recall@1, but a MAP@R of
only about 0.53. Everything is seeded by ``--seed``.

Needs the ``demo`` extra: ``pip install "online_triplet_loss[demo]"``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from .losses import BatchAllTripletLoss, BatchHardTripletLoss, BatchSemiHardTripletLoss
from .metrics import mean_average_precision_at_r, recall_at_k
from .samplers import PKSampler

__all__ = ["main", "parse_args", "run", "Result", "Embedder"]

_LOSSES = {
    "hard": BatchHardTripletLoss,
    "all": BatchAllTripletLoss,
    "semihard": BatchSemiHardTripletLoss,
}
FIGURE = "digits_embedding.png"


@dataclass
class Result:
    """What :func:`run` measured."""

    raw: Dict[str, float]
    before: Dict[str, float]
    after: Dict[str, float]
    losses: List[float]
    figure: str
    seconds: float


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m online_triplet_loss.demo",
        description="Train a digits embedding with online triplet mining and plot it.",
    )
    parser.add_argument("--loss", choices=sorted(_LOSSES), default="hard",
                        help="mining: batch-hard, batch-all or semi-hard (default: hard)")
    parser.add_argument("--margin", type=_non_negative, default=0.2,
                        help="triplet margin, on L2-normalised embeddings (default: 0.2)")
    parser.add_argument("--epochs", type=_positive, default=30, help="epochs (default: 30)")
    parser.add_argument("--out", default="demo-out", help="directory for the figure (default: demo-out)")
    parser.add_argument("--seed", type=_seed, default=0,
                        help="seeds the split, the model and the sampler (default: 0)")
    parser.add_argument("--p", type=_positive, default=10, help="classes per batch (default: 10)")
    parser.add_argument("--k", type=_positive, default=8, help="samples per class (default: 8)")
    parser.add_argument("--lr", type=_positive_float, default=3e-3, help="Adam learning rate (default: 3e-3)")
    parser.add_argument("--dim", type=_positive, default=32, help="embedding size (default: 32)")
    parser.add_argument("--threads", type=_positive, default=1,
                        help="torch threads; the layers are too small to gain from more (default: 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.p > 10:
        parser.error(f"argument --p: the digits have 10 classes, got {args.p}")
    if args.k == 1:
        warnings.warn("--k 1: a batch holds one sample per class, so no anchor has a positive "
                      "and every loss is 0; use --k 2 or more", UserWarning, stacklevel=2)
    if args.p == 1:
        warnings.warn("--p 1: a batch holds one class, so no anchor has a negative and every "
                      "loss is 0; use --p 2 or more", UserWarning, stacklevel=2)
    return args


def _check_writable(out: str) -> None:
    """Fails before training when the figure could not be written."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise SystemExit(f"--out: cannot write the figure to {out!r}: {err}") from None


def _integer(text: str, requirement: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}") from None


def _number(text: str, requirement: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}") from None


def _positive(text: str) -> int:
    value = _integer(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {text!r}")
    if value >= 2**31:
        raise argparse.ArgumentTypeError(f"must be a positive integer below 2**31, got {text!r}")
    return value


def _seed(text: str) -> int:
    value = _integer(text, "an integer in [0, 2**32)")
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, "a number, finite and > 0")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be finite and > 0, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    value = _number(text, "a number, finite and >= 0")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text!r}")
    return value


class Embedder(nn.Module):
    """An MLP whose outputs lie on the unit sphere."""

    def __init__(self, inputs: int, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(inputs, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.normalize(self.net(x), dim=1)


def _require_extras() -> None:
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit(
            f"the demo needs scikit-learn, matplotlib and tqdm ({err}); "
            'install them with: pip install "online_triplet_loss[demo]"'
        ) from None


def _load(seed: int):
    """Digits scaled to [0, 1] and centred on the training mean; a stratified 70/30 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    train, test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.3, stratify=digits.target, random_state=seed
    )
    train, test = torch.from_numpy(train), torch.from_numpy(test)
    mean = x[train].mean(0)
    return x[train] - mean, y[train], x[test] - mean, y[test]


@torch.no_grad()
def _evaluate(model: nn.Module, x: Tensor, y: Tensor) -> Dict[str, float]:
    model.eval()
    embeddings = model(x)
    model.train()
    return _scores(embeddings, y)


def _scores(embeddings: Tensor, y: Tensor) -> Dict[str, float]:
    return {
        "recall@1": recall_at_k(embeddings, y, ks=(1,))[1],
        "MAP@R": mean_average_precision_at_r(embeddings, y),
    }


def run(args: argparse.Namespace) -> Result:
    """Trains, evaluates and plots as ``args`` say; prints the metrics. torch's
    thread count and random generator are as they were afterwards."""
    _require_extras()
    _check_writable(args.out)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> Result:
    start = time.perf_counter()
    from tqdm import tqdm

    x_train, y_train, x_test, y_test = _load(args.seed)
    # The CPU generator alone (run() restores it): torch.manual_seed would
    # seed CUDA's too.
    torch.random.default_generator.manual_seed(args.seed)
    model = Embedder(x_train.shape[1], args.dim)
    criterion = _LOSSES[args.loss](margin=args.margin)
    sampler = PKSampler(y_train, p=args.p, k=args.k, seed=args.seed)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_sampler=sampler)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * len(sampler)
    )

    raw = _scores(x_test, y_test)
    before = _evaluate(model, x_test, y_test)
    print(f"{args.loss} loss, margin {args.margin}, {args.epochs} epochs of "
          f"{len(sampler)} batches of {args.p}x{args.k}, {len(y_train)} train / {len(y_test)} held-out digits")
    print(f"raw pixels:      held-out recall@1 {raw['recall@1']:.4f}, MAP@R {raw['MAP@R']:.4f}")
    print(f"before training: held-out recall@1 {before['recall@1']:.4f}, MAP@R {before['MAP@R']:.4f}")
    losses: List[Tensor] = []
    bar = tqdm(range(args.epochs), desc="training", unit="epoch", disable=args.no_progress)
    for epoch in bar:
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.detach())
        bar.set_postfix(loss=f"{torch.stack(losses[-len(sampler):]).mean().item():.4f}")
    bar.close()
    after = _evaluate(model, x_test, y_test)
    print(f"after training:  held-out recall@1 {after['recall@1']:.4f}, MAP@R {after['MAP@R']:.4f}")

    curve = torch.stack(losses).tolist()
    figure = _plot(model, x_test, y_test, curve, len(sampler), args)
    seconds = time.perf_counter() - start
    print(f"figure: {figure}")
    print(f"took {seconds:.1f} s")
    return Result(raw, before, after, curve, figure, seconds)


def _plot(model: nn.Module, x: Tensor, y: Tensor, curve: List[float], steps_per_epoch: int,
          args: argparse.Namespace) -> str:
    # A bare Figure renders with Agg and leaves pyplot's global state alone.
    from matplotlib.figure import Figure

    with torch.no_grad():
        model.eval()
        embeddings = model(x)
    centred = embeddings - embeddings.mean(0)
    # The top two principal directions; exact, so the figure is deterministic.
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    points = (centred @ v[:2].T).numpy()

    fig = Figure(figsize=(12, 5))
    left, right = fig.subplots(1, 2)
    scatter = left.scatter(points[:, 0], points[:, 1], c=y.numpy(), cmap="tab10", s=8, vmin=-0.5, vmax=9.5)
    fig.colorbar(scatter, ax=left, ticks=range(10), label="digit")
    left.set_title("held-out embeddings, PCA to 2-D")
    left.set_xlabel("PC 1")
    left.set_ylabel("PC 2")
    steps = torch.arange(1, len(curve) + 1) / steps_per_epoch
    right.plot(steps.numpy(), curve, lw=0.6, alpha=0.5, label="batch")
    per_epoch = torch.tensor(curve).view(-1, steps_per_epoch).mean(1)
    right.plot(torch.arange(1, len(per_epoch) + 1).numpy(), per_epoch.numpy(), lw=2, label="epoch mean")
    right.set_title(f"{args.loss} triplet loss (margin {args.margin})")
    right.set_xlabel("epoch")
    right.set_ylabel("loss")
    right.legend()
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, FIGURE)
    fig.savefig(path, dpi=120)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m online_triplet_loss.demo`` and ``online-triplet-loss-demo``."""
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
