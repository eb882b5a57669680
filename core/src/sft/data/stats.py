"""What a prepared dataset looks like: token-length percentiles and histogram, trained-token
fraction, packing efficiency; the run directory's data.json and rejects.jsonl; the drop check.

    stats = split_stats(prepared.train, max_seq_len=2048)
    # {"samples": 990, "tokens": 151234, "trained_tokens": 60211, "trained_fraction": 0.398,
    #  "length": {"min": 12, "p50": 141, "p90": 301, "p99": 612, "max": 1998, "mean": 152.8},
    #  "packing": {"rows": 80, "efficiency": 0.923}, "max_seq_len": 2048}
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from sft.data.batching import pack_rows
from sft.data.cache import PreparedData, TokenizedSplit
from sft.errors import SftError
from sft.rundir import DATA_REPORT, REJECTS


def split_stats(split: TokenizedSplit, max_seq_len: int) -> dict[str, Any]:
    lengths = split.lengths
    tokens = int(lengths.sum())
    trained = split.trained_tokens()
    rows = pack_rows(lengths, max_seq_len) if len(lengths) else []
    pct = np.percentile(lengths, [50, 90, 99]) if len(lengths) else [0, 0, 0]
    return {
        "samples": len(split),
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_fraction": round(trained / tokens, 4) if tokens else 0.0,
        "length": {
            "min": int(lengths.min()) if len(lengths) else 0,
            "p50": float(pct[0]),
            "p90": float(pct[1]),
            "p99": float(pct[2]),
            "max": int(lengths.max()) if len(lengths) else 0,
            "mean": round(float(lengths.mean()), 1) if len(lengths) else 0.0,
        },
        "packing": {
            "rows": len(rows),
            "efficiency": round(tokens / (len(rows) * max_seq_len), 4) if rows else 0.0,
        },
        "max_seq_len": max_seq_len,
    }


def histogram(lengths: np.ndarray, max_seq_len: int, bins: int = 10) -> list[tuple[int, int, int]]:
    """(low, high, count) buckets of equal width up to max_seq_len."""
    edges = np.linspace(0, max_seq_len, bins + 1).astype(int)
    counts, _ = np.histogram(np.clip(lengths, 0, max_seq_len), bins=edges)
    return [(int(edges[i]), int(edges[i + 1]), int(c)) for i, c in enumerate(counts)]


def write_report(data: PreparedData, run_dir: Path) -> None:
    """RUN_DIR/data.json (accounting + stats) and RUN_DIR/rejects.jsonl."""
    run_dir.mkdir(parents=True, exist_ok=True)
    report = {"cache_dir": str(data.cache_dir), "key": data.key, **data.stats}
    (run_dir / DATA_REPORT).write_text(json.dumps(report, indent=2))
    rejects = data.cache_dir / "rejects.jsonl"
    if rejects.is_file():
        shutil.copyfile(rejects, run_dir / REJECTS)


def drop_fraction(acc: dict[str, Any]) -> float:
    lost = sum(acc["dropped"].values()) + sum(acc["rejected"].values())
    return lost / acc["records"] if acc["records"] else 0.0


def check_drop_fraction(stats: dict[str, Any], limit: float) -> None:
    """Stop before training when too much of the training data was lost."""
    acc = stats["train"]
    frac = drop_fraction(acc)
    if frac > limit:
        raise SftError(
            f"{frac:.1%} of the training records were dropped or rejected "
            f"(dropped {acc['dropped']}, rejected {acc['rejected']}), more than "
            f"data.max_drop_fraction {limit:.1%}. See rejects.jsonl and data.json in the run "
            "directory (or `sft data stats`); fix the data, raise data.max_seq_len, or raise "
            "data.max_drop_fraction"
        )
