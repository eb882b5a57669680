"""Held-out loss during MindFormers training (`data.eval` / `data.eval_fraction`,
`eval.every_steps`, `eval.max_batches`): the torch backend's eval rows, computed in the worker.

sft writes the rows the torch backend would evaluate (core's unshuffled eval rows, each rank's
first `eval.max_batches` micro-batches of them) to RUN_DIR/mindformers/data/eval.npz and adds
sft's `SftEvalMonitor` callback (`sft_mindspore.heldout_callback`) to the MindFormers YAML:

    callbacks: [..., {type: SftEvalMonitor, dataset: .../eval.npz, every_steps: 50,
                      last_step: 200}]

After every `every_steps`-th optimizer step and after the last one, the callback runs the
training network itself in eval mode (no dropout) over those rows and prints one line,

    [sft] eval {"step": 50, "eval_loss": 1.93, "eval_ppl": 6.89, "eval_tokens": 412.0}

which `sft_mindspore.logs.LiveRows` turns into the metrics.jsonl eval row (torch's keys and
meaning: summed token cross-entropy over the trained tokens / their count, and its exp). Every
rank evaluates all the rows (the same input on each rank, which semi-auto parallel's full_batch
also expects); rank 0's line is the one recorded.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from sft.data.batching import Row, epoch_rows, micro_batches, shard_for_rank
from sft.data.cache import TokenizedSplit

EVAL_FILE = "eval.npz"
LINE_PREFIX = "[sft] eval "
_LINE = re.compile(r"^\[sft\] eval (\{.*\})\s*$", re.MULTILINE)


def enabled(plan: Any) -> bool:
    split = plan.data.eval
    return split is not None and len(split) > 0


def eval_rows(split: TokenizedSplit, config: Any) -> list[Row]:
    """The rows the torch backend evaluates (sft_torch.distributed.eval_micro_batches): core's
    unshuffled epoch rows, split over the data-parallel ranks, each rank's first
    `eval.max_batches` micro-batches; all ranks' rows together."""
    rows = epoch_rows(
        split.lengths,
        max_seq_len=config.data.max_seq_len,
        packing=False,
        shuffle=False,
        seed=0,
        epoch=0,
    )
    world = config.parallel.world_size
    out: list[Row] = []
    for rank in range(world):
        mbs = micro_batches(shard_for_rank(rows, rank, world), config.train.micro_batch_size)
        if config.eval.max_batches:
            mbs = mbs[: config.eval.max_batches]
        out += [row for mb in mbs for row in mb]
    return out


def seq_length(train_seq_length: int, plan: Any) -> int:
    """The static sequence length MindFormers compiles for, long enough for the eval rows too
    (padding is masked, so a longer one changes no training loss)."""
    if not enabled(plan):
        return train_seq_length
    from sft_mindspore.data import seq_length_for

    return max(train_seq_length, seq_length_for(plan.data.eval, plan.config.data.max_seq_len))


def write_eval_data(plan: Any, seq_length: int, out_dir: Path) -> Path | None:
    """RUN_DIR/mindformers/data/eval.npz: input_ids and labels [rows, seq_length + 1] int32,
    labels not shifted (the MindRecord's layout)."""
    if not enabled(plan):
        return None
    from sft_mindspore.data import row_arrays

    rows = eval_rows(plan.data.eval, plan.config)
    arrays = row_arrays(plan.data.eval, rows, plan.data.pad_id, seq_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / EVAL_FILE
    np.savez(path, input_ids=arrays["input_ids"], labels=arrays["labels"])
    return path


def callback_entry(plan: Any, dataset: Path, total_steps: int) -> dict[str, Any] | None:
    """The YAML's SftEvalMonitor entry, or None when the run has no eval data."""
    if not enabled(plan):
        return None
    return {
        "type": "SftEvalMonitor",
        "dataset": str(dataset),
        "every_steps": plan.config.eval.every_steps or 0,
        "last_step": total_steps,
    }


def token_nll(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """(summed cross-entropy, count) over positions whose label is not -100; `logits` [N, V]
    and `labels` [N] are already aligned (position t's logits predict labels[t]). float64."""
    keep = labels != -100
    if not keep.any():
        return 0.0, 0
    rows = logits[keep].astype(np.float64)
    top = rows.max(axis=1, keepdims=True)
    lse = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
    picked = rows[np.arange(len(rows)), labels[keep]]
    return float((lse - picked).sum()), int(keep.sum())


def result(step: int, total: float, count: int) -> dict[str, Any]:
    """The eval row: torch's `eval_loss`, `eval_ppl`, `eval_tokens`."""
    mean = total / count
    return {
        "step": step,
        "eval_loss": mean,
        "eval_ppl": math.exp(min(mean, 50.0)),
        "eval_tokens": float(count),
    }


def format_line(row: dict[str, Any]) -> str:
    return LINE_PREFIX + json.dumps(row)


def parse_lines(text: str) -> list[dict[str, Any]]:
    """The eval rows printed in a worker's output."""
    out = []
    for m in _LINE.finditer(text):
        try:
            row = json.loads(m.group(1))
        except ValueError:
            continue
        out.append(row)
    return out
