"""Torch-side reference for the MindSpore inference tests; runs in the torch environment.

For each job, the torch backend's own `sft eval` computation (`sft_torch.eval.evaluate`: greedy
answers with the model's chat template and end-of-turn ids, and the held-out chat loss) on one
model (a run directory or an HF directory). All jobs run in one process.

    $ $SFT_TORCH_PYTHON tests/backends/mindspore/torch_eval.py JOBS.json OUT.json
    JOBS.json: [{"model": DIR, "data": "eval.jsonl", "max_new_tokens": 8}, ...]
    OUT.json:  [{...evaluate's dict...}, ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from sft_torch.eval import evaluate


def main() -> None:
    jobs_path, out_path = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    jobs = json.loads(Path(jobs_path).read_text())
    results = [evaluate(j["model"], Path(j["data"]), j["max_new_tokens"]) for j in jobs]
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
