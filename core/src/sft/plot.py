"""`loss.png`: the training (and eval) loss curve of a run, drawn from its metrics.jsonl.

    plot_loss(run_dir)   # -> run_dir / "loss.png", or None when matplotlib is not installed

Reads metrics.jsonl rather than in-memory values, so a resumed run plots its whole history.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sft.events import read_metrics
from sft.rundir import LOSS_PLOT


def plot_loss(run_dir: Path, title: str = "") -> Path | None:
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1.2)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss", markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.set_title(title or Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(run_dir) / LOSS_PLOT
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
