"""Losses from MindFormers' training log, as metrics.jsonl rows (the torch backend's keys).

MindFormers' MFLossMonitor prints one line per step in each worker's log:

    { Epoch:[  1/  1], step:[    3/   10], loss:[5.612345/5.7], per_step_time: 21ms,
      lr: 0.0002, overflow cond: False, loss_scale: 1.0, global_norm: [1.234], ...

    rows = parse_losses(log_dir)   # [{"step": 3, "loss": 5.612345, "lr": 2e-4, ...}, ...]
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_LINE = re.compile(
    r"step:\[\s*(\d+)/\s*\d+\], loss: ?\[?([-+0-9.eEnaif]+)[/,].*?"
    r"per_step_time: (\d+)ms, lr: ([-+0-9.eE]+).*?overflow cond: (\w+)"
    r"(?:.*?global_norm: \[?([-+0-9.eEnaif]+))?"
)


def worker_logs(log_dir: Path) -> list[Path]:
    """worker_R.log of every rank on this node (msrun's names; one worker writes worker_0.log)."""
    logs = sorted(
        Path(log_dir).glob("worker_*.log"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0)
    )
    return logs


def parse_lines(text: str) -> list[dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    for m in _LINE.finditer(text):
        step, loss, ms, lr, overflow, norm = m.groups()
        row: dict[str, Any] = {
            "step": int(step),
            "loss": float(loss),
            "lr": float(lr),
            "step_time_s": int(ms) / 1000.0,
        }
        if norm is not None:
            row["grad_norm"] = float(norm)
        if overflow == "True":
            row["skipped"] = 1.0  # non-finite gradients: MindFormers skipped the update
        rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


def parse_losses(log_dir: Path) -> list[dict[str, Any]]:
    """Per-step rows; with several data-parallel ranks the loss is the mean of the ranks'
    losses (what the averaged gradient descends), and `loss_rank0` keeps rank 0's own."""
    per_rank = [parse_lines(p.read_text(errors="replace")) for p in worker_logs(log_dir)]
    per_rank = [rows for rows in per_rank if rows]
    if not per_rank:
        return []
    out = []
    for i, row in enumerate(per_rank[0]):
        losses = [rows[i]["loss"] for rows in per_rank if i < len(rows)]
        if len(per_rank) > 1:
            row = {**row, "loss": sum(losses) / len(losses), "loss_rank0": row["loss"]}
        out.append(row)
    return out
