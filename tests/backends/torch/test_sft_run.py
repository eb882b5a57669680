"""End to end through `sft run` (load_config + sft.run.run) on a tiny model and a small jsonl:
the real data pipeline, the torch loop, checkpoints, resume, and everything in the run dir.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_sft_run.py
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from sft.config import load_config
from sft.errors import ConfigError
from sft.events import read_metrics
from sft.run import run

pytestmark = pytest.mark.torch

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Tell me a joke about cats.", "Cats sleep all day."),
    ("Translate to German: good morning.", "Guten Morgen."),
    ("Write a haiku about the sea.", "Waves fold into foam."),
    ("Hello!", "Hello! How can I help you today?"),
    ("Summarize: the meeting moved to Tuesday.", "Meeting on Tuesday."),
]


def write_job(tmp_path, model_dir, **extra):
    data = tmp_path / "train.jsonl"
    with data.open("w") as f:
        for i in range(4):
            for q, a in QA:
                f.write(
                    json.dumps(
                        {
                            "messages": [
                                {"role": "user", "content": f"{q} ({i})"},
                                {"role": "assistant", "content": a},
                            ]
                        }
                    )
                    + "\n"
                )
    job = {
        "model": str(model_dir),
        "data": {"train": str(data), "max_seq_len": 64, "eval_fraction": 0.2},
        "method": {"name": "lora", "r": 4},
        "train": {
            "max_steps": 6,
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "learning_rate": 5e-3,
            "precision": "fp32",
        },
        "checkpoint": {"every_steps": 3},
        "eval": {"every_steps": 3},
        "logging": {"progress": False},
        "output_dir": str(tmp_path / "run"),
        "torch": {"device": "cpu", "num_threads": 1},
        **extra,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.slow
def test_sft_run_end_to_end_and_resume(tmp_path, tiny_llama):
    job = write_job(tmp_path, tiny_llama)
    summary = run(load_config(job))
    run_dir = tmp_path / "run"
    assert summary["steps"] == 6 and summary["final_loss"] > 0
    assert summary["packing"] is True  # data.packing auto: the torch backend packs
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "loss.png",
        "final/adapter/adapter_config.json",
        "final/adapter/adapter_model.safetensors",
        "final/adapter/tokenizer_config.json",
        "final/adapter/generation_config.json",
        "checkpoints/step-000006/sft-checkpoint.json",
    ):
        assert (run_dir / name).is_file(), name
    gen = json.loads((run_dir / "final/adapter/generation_config.json").read_text())
    assert gen["eos_token_id"] == [2]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    last_eval = [r for r in rows if "eval_loss" in r][-1]
    assert summary["metrics"]["eval_loss"] == last_eval["eval_loss"] > 0
    assert summary["metrics"]["tokens_per_s"] > 0

    # A longer run resumed from the last checkpoint continues at step 7
    longer = run(load_config(job, ["train.max_steps=8", "checkpoint.resume=auto"]))
    assert longer["resumed_from"].endswith("step-000006")
    assert longer["metrics"]["resumed_at_step"] == 6 and longer["steps"] == 8
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, 9))


@pytest.mark.skipif(torch.cuda.is_available(), reason="qlora and fp16 are valid on a GPU host")
def test_config_errors_on_a_cpu_machine(tmp_path, tiny_llama):
    job = write_job(tmp_path, tiny_llama)
    with pytest.raises(ConfigError) as err:
        load_config(job, ["method.name=qlora", "train.precision=fp16"])
    text = str(err.value)
    assert "qlora" in text and "method: lora" in text
    assert "train.precision" in text and "fp16" in text
    with pytest.raises(ConfigError, match=r"torch\.packed_attention"):
        load_config(job, ["torch.packed_attention=sideways"])
