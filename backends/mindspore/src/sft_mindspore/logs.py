"""Losses from MindFormers' training log, as metrics.jsonl rows (the torch backend's keys).

MindFormers' MFLossMonitor prints one line per step in each worker's log:

    { Epoch:[  1/  1], step:[    3/   10], loss:[5.612345/5.7], per_step_time: 21ms,
      lr: 0.0002, overflow cond: False, loss_scale: 1.0, global_norm: [1.234], ...

    rows = parse_losses(log_dir)   # [{"step": 3, "loss": 5.612345, "lr": 2e-4, ...}, ...]
    for step, row in metric_rows(rows, steps): events.log(step, row)

`metric_rows` gives MindFormers' per-step numbers the meaning of every key that the torch backend
writes (`sft.events.TRAIN_ROW_KEYS`): cumulative token counts, a token-weighted loss over the
logging interval, the lr the step trained with, the gradient norm before clipping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_mindspore import heldout

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
    losses, `rank_losses` has each rank's (its own token mean; `metric_rows` weights them by
    the ranks' trained tokens) and `loss_rank0` keeps rank 0's."""
    per_rank = [parse_lines(p.read_text(errors="replace")) for p in worker_logs(log_dir)]
    per_rank = [rows for rows in per_rank if rows]
    if not per_rank:
        return []
    out = []
    for i, row in enumerate(per_rank[0]):
        losses = [rows[i]["loss"] for rows in per_rank if i < len(rows)]
        if len(per_rank) > 1:
            row = {
                **row,
                "loss": sum(losses) / len(losses),
                "loss_rank0": row["loss"],
                "rank_losses": losses,
            }
        out.append(row)
    return out


@dataclass
class StepTokens:
    """What core's schedule says about one optimizer step."""

    trained: int
    """Trained (loss) tokens of the step, all ranks."""
    tokens: int
    """Non-padding tokens of the step, all ranks."""
    epoch: int
    trained_ranks: list[int] | None = None
    """Trained tokens of each data-parallel rank's share of the step (several ranks only)."""


def step_loss(rec: dict[str, Any], info: StepTokens) -> float:
    """The step's loss over the global batch: with data parallel, the ranks' token means
    weighted by their trained tokens (= summed token losses / all trained tokens)."""
    losses = rec.get("rank_losses")
    if not losses or not info.trained_ranks or len(losses) != len(info.trained_ranks):
        return float(rec["loss"])
    total = sum(info.trained_ranks)
    if total == 0:
        return float(rec["loss"])
    return sum(x * n for x, n in zip(losses, info.trained_ranks, strict=True)) / total


def metric_rows(
    records: list[dict[str, Any]], steps: list[StepTokens], start: int = 0
) -> list[tuple[int, dict[str, Any]]]:
    """(step, metrics.jsonl row) for each `parse_losses` record. `start`: the step this process
    began after (0, or the step a resumed run continues from).

    MindFormers prints every `logging.every_steps`-th step (its per_print_times) with that step's
    own values; token counts still cover every step since the previous row. Logging every step
    (the default), each row is exactly the torch backend's; with a longer interval, `loss`,
    `grad_norm` and `tokens_per_s` are the printed step's own (torch averages `loss` and the
    throughput over the interval)."""
    rows = RowBuilder(steps, start)
    return [rows.add(rec) for rec in records]


class RowBuilder:
    """`metric_rows` one record at a time (the live reader adds each step as MindFormers logs
    it; the cumulative token counts carry over between calls)."""

    def __init__(
        self, steps: list[StepTokens], start: int = 0, carry: dict[str, Any] | None = None
    ) -> None:
        """`carry`: the metrics row of step `start` whose cumulative counts continue here
        (back-filling a killed launch's rows); None counts from 0 (a launch's own rows)."""
        self.steps, self.prev = steps, start
        carry = carry or {}
        self.total_trained = int(carry.get("trained_tokens", 0))
        self.total_tokens = int(carry.get("tokens", 0))
        self.skipped = int(carry.get("skipped_steps", 0))

    def add(self, rec: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        steps, step = self.steps, rec["step"]
        info = steps[step - 1]
        between = steps[self.prev : step - 1]  # steps MindFormers trained but did not print
        self.total_tokens += sum(s.tokens for s in between) + info.tokens
        self.total_trained += sum(s.trained for s in between)
        row: dict[str, Any] = {"tokens_per_s": info.tokens / max(rec["step_time_s"], 1e-9)}
        if rec.get("skipped"):
            self.skipped += 1  # no update: trains nothing, no loss to report (as torch)
        else:
            self.total_trained += info.trained
            row["loss"] = step_loss(rec, info)
        row.update(
            {
                "trained_tokens": float(self.total_trained),
                "tokens": float(self.total_tokens),
                "lr": rec["lr"],
                "epoch": float(info.epoch),
            }
        )
        if "grad_norm" in rec:
            row["grad_norm"] = rec["grad_norm"]
        if "loss_rank0" in rec:
            row["loss_rank0"] = rec["loss_rank0"]
        if self.skipped:
            row["skipped_steps"] = float(self.skipped)
        self.prev = step
        return step, row


def merge_ranks(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """One step's record from each data-parallel rank (rank 0 first) -> the step's record."""
    row = per_rank[0]
    if len(per_rank) == 1:
        return row
    losses = [r["loss"] for r in per_rank]
    return {
        **row,
        "loss": sum(losses) / len(losses),
        "loss_rank0": row["loss"],
        "rank_losses": losses,
    }


class LiveRows:
    """metrics.jsonl rows while MindFormers trains: `feed(rank, text)` takes what a worker wrote
    to its log since the last call (any chunking: a partial line waits for its end); a step is
    emitted, once and in order, when every rank of this node has logged it, through
    `emit(step, row, record)`. `rows` keeps what was emitted."""

    def __init__(self, steps: list[StepTokens], ranks: int, start: int, emit: Any) -> None:
        self.builder = RowBuilder(steps, start)
        self.ranks, self.emit, self.done, self.start = ranks, emit, start, start
        self.partial = [""] * ranks
        self.seen: list[dict[int, dict[str, Any]]] = [{} for _ in range(ranks)]
        self.rows: list[tuple[int, dict[str, Any]]] = []
        self.records: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        """Eval rows emitted (`sft_mindspore.heldout`), rank 0's."""
        self.pending_evals: list[dict[str, Any]] = []

    def feed(self, rank: int, text: str) -> None:
        lines = (self.partial[rank] + text).split("\n")
        self.partial[rank] = lines.pop()  # "" after a complete line
        chunk = "\n".join(lines)
        for rec in parse_lines(chunk):
            if rec["step"] > self.done:
                self.seen[rank][rec["step"]] = rec
        if rank == 0:
            self.pending_evals += [e for e in heldout.parse_lines(chunk) if e["step"] > self.start]
        while True:
            self.emit_evals()
            ready = [seen.get(s) for seen in self.seen for s in [self._next()]]
            if not ready or any(r is None for r in ready):
                return
            rec = merge_ranks(ready)  # type: ignore[arg-type]
            for seen in self.seen:
                seen.pop(rec["step"])
            self.emit_record(rec)

    def emit_evals(self) -> None:
        """Eval rows go out after the training rows of their step and of every step before
        (as torch writes them): once rank 0 has no unemitted training step up to theirs."""
        while self.pending_evals:
            ev = self.pending_evals[0]
            if any(s <= ev["step"] for s in self.seen[0]):
                return
            self.pending_evals.pop(0)
            row = {k: v for k, v in ev.items() if k != "step"}
            self.evals.append(ev)
            self.emit(int(ev["step"]), row, ev)

    def emit_record(self, rec: dict[str, Any]) -> None:
        step, row = self.builder.add(rec)
        self.done = step
        self.rows.append((step, row))
        self.records.append(rec)
        self.emit(step, row, rec)

    def _next(self) -> int:
        """The smallest step logged by rank 0 after the last emitted one (MindFormers may print
        every n-th step only), or -1."""
        after = [s for s in self.seen[0] if s > self.done]
        return min(after) if after else -1


def missing_rows(
    logs: list[Path], steps: list[StepTokens], kept: list[dict[str, Any]], upto: int
) -> tuple[list[tuple[int, dict[str, Any]]], list[int]]:
    """The metrics rows of steps <= `upto` that a killed launch logged (its worker logs `logs`,
    one per local rank) but that never reached metrics.jsonl (`kept`: its rows): `sft run`
    writes a step's row once every rank's log line is read, so SIGKILL can land after the
    workers saved the checkpoint of step `upto` but before its row (or the rows before it) was
    written, and the resumed launch starts after `upto`. Returns ((step, row) in file order,
    training and eval rows; the steps still missing, which no log holds)."""
    train = [r for r in kept if "trained_tokens" in r]
    last = train[-1] if train else {}
    after = int(last.get("step", 0))
    last_eval = max((int(r["step"]) for r in kept if "eval_loss" in r), default=0)
    texts = [p.read_text(errors="replace") if p.exists() else "" for p in logs]
    by_rank = [{r["step"]: r for r in parse_lines(t)} for t in texts]
    builder = RowBuilder(steps, after, last)
    out: list[tuple[int, dict[str, Any]]] = []
    for step in range(after + 1, upto + 1):
        recs = [b.get(step) for b in by_rank]
        if all(r is not None for r in recs):
            out.append(builder.add(merge_ranks(recs)))  # type: ignore[arg-type]
    found = {s for s, _ in out}
    out += [
        (int(e["step"]), {k: v for k, v in e.items() if k != "step"})
        for e in heldout.parse_lines(texts[0])
        if last_eval < e["step"] <= upto
    ]
    # an eval row after the training row of its step, as the live reader writes them
    out.sort(key=lambda sr: (sr[0], "eval_loss" in sr[1]))
    return out, [s for s in range(after + 1, upto + 1) if s not in found]
