"""End to end: `sft run --backend mindspore` from a YAML job spec and a jsonl file, through core's
data pipeline, MindFormers on CPU, and back to HF / PEFT outputs and summary.json.

    $ .venvs/ms/bin/python -m pytest tests/backends/mindspore/test_e2e.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mindspore")

from sft.cli import main

pytestmark = [pytest.mark.mindspore, pytest.mark.slow]

CHATS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Tell me a joke about cats.", "Cats jump over the lazy dog."),
    ("Translate to German: good morning.", "Guten Morgen."),
    ("Write a haiku about the sea.", "Waves fold into foam, salt wind carries gull voices."),
]


def _job(tmp_path, model) -> None:
    lines = [
        json.dumps(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        )
        for q, a in CHATS
    ]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "job.yaml").write_text(
        "backend: mindspore\n"
        f"model: {model}\n"
        "data: {train: chat.jsonl, max_seq_len: 128}\n"
        "method: {name: lora, r: 8, alpha: 16, dropout: 0.0}\n"
        "train: {max_steps: 6, micro_batch_size: 2, learning_rate: 0.01, warmup_steps: 0}\n"
        f"output_dir: {tmp_path / 'run'}\n"
        "mindspore: {device_target: CPU, threads: 1}\n"
        "export: {formats: [hf, adapter, ckpt, gguf], dtype: f16}\n"
    )


def test_sft_data_prepare_format_mindrecord(tmp_path, tiny_qwen2, capsys):
    from sft.data.cache import PreparedData
    from sft_mindspore.data import read_mindrecord

    _job(tmp_path, tiny_qwen2)
    assert (
        main(["data", "prepare", "--config", str(tmp_path / "job.yaml"), "--format", "mindrecord"])
        == 0
    )
    path = capsys.readouterr().out.strip().splitlines()[-1].split("mindrecord: ", 1)[1]
    cache = PreparedData.load(Path(path).parent.parent)
    records = read_mindrecord(path)
    assert len(records) == len(cache.train) == len(CHATS)
    for rec in records:  # every record is one cached sample, padded, first label masked
        ids = rec["input_ids"]
        match = [
            i
            for i in range(len(cache.train))
            if np.array_equal(ids[: len(cache.train.sample(i)[0])], cache.train.sample(i)[0])
        ]
        assert match, ids
        labels = cache.train.sample(match[0])[1]
        assert np.array_equal(rec["labels"][1 : len(labels)], labels[1:])


def test_sft_run_backend_mindspore(tmp_path, tiny_qwen2, capsys):
    _job(tmp_path, tiny_qwen2)
    assert main(["run", "--backend", "mindspore", "--config", str(tmp_path / "job.yaml")]) == 0
    # packing: auto differs between backends (issue #22): said at plan time, with the fix
    err = capsys.readouterr().err
    assert "data.packing: auto -> no packing on backend 'mindspore'" in err
    assert "set data.packing: false to train identical batches" in err
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["backend"] == "mindspore" and summary["steps"] == 6
    assert summary["packing"] is False  # packing: auto is off on CPU
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert (run / "mindformers.yaml").is_file() and (run / "config.yaml").is_file()
    for out in ("model", "adapter", "ckpt"):
        assert out in summary["outputs"]
    # export.formats, made after training through `sft export`'s exporters: hf and adapter
    # by this environment's numpy exporters, ckpt by MindSpore, gguf by its plugin from hf
    for fmt in ("hf", "adapter", "ckpt", "gguf"):
        report = json.loads((run / "exports" / fmt / f"export-{fmt}.json").read_text())
        assert report["ok"], (fmt, report)
        assert summary["outputs"][f"export_{fmt}"] == report["path"]
    hf = run / "exports" / "hf"
    from safetensors.numpy import load_file

    exported = load_file(str(hf / "model.safetensors"))  # the format's own reader
    merged = load_file(str(run / "final" / "model" / "model.safetensors"))
    assert set(exported) == set(merged)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert exported[name].dtype == np.float16
    assert np.allclose(exported[name], merged[name], atol=1e-3)
    tok = json.loads((run / "final" / "adapter" / "tokenizer_config.json").read_text())
    assert "im_start" in (
        tok.get("chat_template") or (run / "final" / "adapter" / "chat_template.jinja").read_text()
    )
