"""Run events: what a backend reports while it trains, written to `metrics.jsonl` and passed to
the lifecycle hooks (loggers, trackers such as the TensorBoard plugin).

    events.train_start({"params": n, "trainable": k})
    events.log(step, {"loss": 1.9, "lr": 2e-4, "grad_norm": 0.8, "tokens_per_s": 812.0})
    events.train_end(summary)   # core calls this with summary.json's contents
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from sft.rundir import metrics_path
from sft.specs import RunConfig

#: Keys of a training row of metrics.jsonl that every backend writes, and what each means (the
#: table in docs/reliability.md; the MindSpore parity tests compare both backends against it).
TRAIN_ROW_KEYS = {
    "step": "optimizer steps done (1-based); a row every logging.every_steps and at the last step",
    "time": "Unix time the row was written",
    "loss": "training loss: summed token cross-entropy / trained tokens, over the steps since the "
    "previous row (token-weighted; the step's own loss when logging every step)",
    "lr": "learning rate the row's step trained with (before the scheduler advanced)",
    "grad_norm": "global L2 norm of the row's step's gradients, BEFORE clipping",
    "trained_tokens": "trained (loss) tokens of all applied steps so far in this process "
    "(cumulative; a resumed run counts from its restart)",
    "tokens": "non-padding tokens (prompt + trained) of all steps so far in this process "
    "(cumulative)",
    "tokens_per_s": "non-padding tokens per second over the steps since the previous row",
    "epoch": "0-based epoch of the row's step",
}
#: Keys of summary.json's `metrics` that every backend writes, and what each means.
SUMMARY_KEYS = {
    "device": "device the run trained on (the backend's own spelling: cpu, cuda:0, CPU, Ascend)",
    "total_steps": "optimizer steps of the whole run",
    "rows_per_step": "rows (samples, or packed rows) per optimizer step over all processes",
    "world_size": "training processes (devices)",
    "trained_tokens": "trained tokens of all applied steps in this process (= the last row's)",
    "tokens": "non-padding tokens of all steps in this process (= the last row's)",
    "tokens_per_s": "tokens / train_time_s",
    "trained_tokens_per_s": "trained_tokens / train_time_s",
    "train_time_s": "seconds spent in training steps (no loading, compiling outside steps, export)",
    "elapsed_s": "wall seconds of the backend's train call",
    "resumed_at_step": "optimizer step the run resumed after (0 for a fresh run)",
    "skipped_steps": "steps whose update was skipped (non-finite loss or gradients), a list",
}


class RunEvents:
    def __init__(self, config: RunConfig, run_dir: Path, hook: Any, is_main: bool = True) -> None:
        self.config, self.run_dir, self.hook, self.is_main = config, run_dir, hook, is_main
        self.metrics_path = metrics_path(run_dir)

    def restart(self, step: int) -> None:
        """The run (re)starts after optimizer step `step` (0: fresh): metrics.jsonl keeps only
        the rows of steps <= `step`, so steps a killed process logged after its last checkpoint
        are not repeated when the resumed run logs them again. Written to a temporary file and
        renamed over metrics.jsonl, so a crash here leaves the old or the new file, never half."""
        if not self.is_main or not self.metrics_path.exists():
            return
        kept = [
            line
            for line in self.metrics_path.read_text().splitlines(keepends=True)
            if line.strip() and line.endswith("\n") and _step_of(line) <= step
        ]
        tmp = self.metrics_path.with_name(f".metrics.jsonl.tmp{os.getpid()}")
        with tmp.open("w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.metrics_path)

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


def _step_of(line: str) -> int:
    """A metrics.jsonl line's step; a line that does not parse (a process killed while writing
    it) counts as after every step, so restart() drops it."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 2**62


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of a run's metrics.jsonl (last value wins for a step logged twice by a resume)."""
    path = metrics_path(run_dir)
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
