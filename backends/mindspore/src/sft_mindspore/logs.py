"""Losses from MindFormers' training log, as metrics.jsonl rows (the torch backend's keys).

MindFormers' MFLossMonitor prints one line per step (rank 0's worker log):

    { Epoch:[  1/  1], step:[    3/   10], loss:[5.612345/5.7], per_step_time: 21ms,
      lr: 0.0002, overflow cond: False, loss_scale: 1.0, global_norm: [1.234], ...

    rows = parse_losses(log_dir)   # [{"step": 3, "loss": 5.612345, "lr": 2e-4, ...}, ...]
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_LINE = re.compile(r"step:\[\s*(\d+)/\s*\d+\], loss: ?\[?([-+0-9.eEnaif]+)[/,].*?"
                   r"per_step_time: (\d+)ms, lr: ([-+0-9.eE]+).*?overflow cond: (\w+)"
                   r"(?:.*?global_norm: \[?([-+0-9.eEnaif]+))?")


def rank0_log(log_dir: Path) -> Path:
    for name in ("worker_0.log", "msrun/worker_0.log"):
        if (Path(log_dir) / name).exists():
            return Path(log_dir) / name
    return Path(log_dir) / "worker_0.log"


def parse_lines(text: str) -> list[dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    for m in _LINE.finditer(text):
        step, loss, ms, lr, overflow, norm = m.groups()
        row: dict[str, Any] = {"step": int(step), "loss": float(loss), "lr": float(lr),
                               "step_time_s": int(ms) / 1000.0}
        if norm is not None:
            row["grad_norm"] = float(norm)
        if overflow == "True":
            row["skipped"] = 1.0  # non-finite gradients: MindFormers skipped the update
        rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


def parse_losses(log_dir: Path) -> list[dict[str, Any]]:
    log = rank0_log(log_dir)
    return parse_lines(log.read_text(errors="replace")) if log.exists() else []
