"""Run events: what a backend reports while it trains, written to `metrics.jsonl` and passed to
the lifecycle hooks (loggers, trackers such as the TensorBoard plugin).

    events.train_start({"params": n, "trainable": k})
    events.log(step, {"loss": 1.9, "lr": 2e-4, "grad_norm": 0.8, "tokens_per_s": 812.0})
    events.train_end(summary)   # core calls this with summary.json's contents
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from sft.specs import RunConfig


class RunEvents:
    def __init__(self, config: RunConfig, run_dir: Path, hook: Any, is_main: bool = True) -> None:
        self.config, self.run_dir, self.hook, self.is_main = config, run_dir, hook, is_main
        self.metrics_path = run_dir / "metrics.jsonl"

    def train_start(self, info: dict[str, Any]) -> None:
        if self.is_main:
            self.hook.sft_train_start(config=self.config, run_dir=str(self.run_dir), info=info)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one line to metrics.jsonl (`{"step": .., "time": .., **metrics}`)."""
        if not self.is_main:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        line = {"step": step, "time": round(time.time(), 3), **clean}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(line, allow_nan=True) + "\n")
        self.hook.sft_log_metrics(step=step, metrics=clean, run_dir=str(self.run_dir))

    def train_end(self, summary: dict[str, Any]) -> None:
        if self.is_main:
            self.hook.sft_train_end(config=self.config, run_dir=str(self.run_dir), summary=summary)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of a run's metrics.jsonl (last value wins for a step logged twice by a resume)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            kind = "eval" if "eval_loss" in row else "train"
            rows[(int(row["step"]), kind)] = row
    return [rows[k] for k in sorted(rows)]


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
