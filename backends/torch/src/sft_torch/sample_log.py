"""Opt-in record of the samples each rank trains at each optimizer step, to check data sharding
(tests/backends/torch/test_distributed.py) or debug it. Off unless the environment has
SFT_LOG_SAMPLE_IDS=1; then rank r appends one line per step to
`<run_dir>/logs/samples/rank-<r>.jsonl`:

    {"step": 3, "rows": [[4], [17, 2]]}

`rows` are the rows of this rank's real micro-batches in order, each a list of sample indices
of the training split (several when packed); padding micro-batches (weight 0) are left out. A
resumed run appends the steps it repeats again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV = "SFT_LOG_SAMPLE_IDS"


def sample_log_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / "logs" / "samples" / f"rank-{rank}.jsonl"


class SampleLog:
    def __init__(self, run_dir: Path, rank: int) -> None:
        self.path = sample_log_path(run_dir, rank) if os.environ.get(ENV) == "1" else None

    def write(self, step: int, micro_batches: list[tuple[list[Any], float]]) -> None:
        if self.path is None:
            return
        rows = [[int(i) for i in row] for mb, weight in micro_batches if weight for row in mb]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "rows": rows}) + "\n")


def read_sample_log(run_dir: Path, rank: int) -> dict[int, list[list[int]]]:
    """step -> rows of one rank's log (the last line wins for a step logged twice)."""
    text = sample_log_path(run_dir, rank).read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    return {r["step"]: r["rows"] for r in lines}
