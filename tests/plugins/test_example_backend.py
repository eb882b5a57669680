"""The backend contract, end to end: the example backend (its own distribution, found through the
`sft` entry-point group) receives a correct plan from `sft run --backend example`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from sft.data.cache import PreparedData


def chats(n: int) -> str:
    rows = []
    for i in range(n):
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {i} + {i}?"},
                    {
                        "role": "assistant",
                        "content": f"{i} + {i} is {2 * i}." + " Hello!" * (i % 4),
                    },
                ]
            }
        )
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_sft_run_hands_the_example_backend_a_correct_plan(tiny_llama: Path, tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text(chats(10))
    config = {
        "backend": "example",
        "model": str(tiny_llama),
        "data": {"train": "train.jsonl", "max_seq_len": 64, "packing": True},
        "train": {"micro_batch_size": 2, "global_batch_size": 4},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "sft", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "SFT_DISABLE_PLUGIN_AUTOLOAD": ""},
    )
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    report = json.loads((run / "example-report.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    data = PreparedData.load(summary["data_cache"])
    assert report["problems"] == []
    assert report["samples"] == len(data.train) == 10
    assert report["model_type"] == "llama" and report["packing"] is True
    assert report["rows_per_step"] == 4 and report["data_key"] == data.key
    assert report["trained_tokens"] == data.train.trained_tokens()
    assert summary["steps"] == report["steps"] > 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, report["steps"] + 1))
    assert (run / "config.yaml").is_file()
