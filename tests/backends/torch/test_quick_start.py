"""`sft run` without a YAML file: --model / --data / --method and key=value overrides build the
spec, it is validated like a file, and the resolved spec lands in RUN_DIR/config.yaml so that
`sft run -c RUN_DIR/config.yaml` repeats the run.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_quick_start.py -q
"""

from __future__ import annotations

import json

import pytest
from sft.cli import main
from sft.config import load_config

pytestmark = pytest.mark.torch


def _data(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Hi {i}"},
                {"role": "assistant", "content": "Hello!"},
            ]
        }
        for i in range(8)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_quick_start_trains_and_writes_a_repeatable_spec(tmp_path, tiny_llama, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _data(tmp_path)
    args = ["run", "--model", str(tiny_llama), "--data", "train.jsonl", "--method", "full"]
    args += [
        "train.max_steps=2",
        "logging.progress=false",
        "torch.device=cpu",
        "data.max_seq_len=32",
    ]
    assert main(args) == 0
    run_dir = tmp_path / "runs" / f"{tiny_llama.name}-full"
    spec = run_dir / "config.yaml"
    out = capsys.readouterr().out
    assert f"repeat with: sft run -c {spec}" in out
    assert "done: 2 steps" in out
    again = load_config(spec)
    assert again.method.name == "full" and again.train.max_steps == 2
    assert again.data.train[0].path == str(tmp_path / "train.jsonl")  # resolved, not relative
    assert again.model.name_or_path == str(tiny_llama)
    assert again.output_dir == str(run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["method"] == "full"


def test_quick_start_is_validated_like_a_file(tmp_path, tiny_llama, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _data(tmp_path)
    code = main(["run", "--model", str(tiny_llama), "--data", "train.jsonl", "train.lr=1"])
    err = capsys.readouterr().err
    assert code == 2 and "Config is not well-formed" in err
    assert "train.lr: unknown key (allowed: betas," in err
    assert not (tmp_path / "runs").exists()  # nothing runs before the spec is valid


def test_quick_start_needs_model_and_data(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--data", "train.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "--model: missing: sft run needs --config FILE, or --model and --data" in err
    assert "Traceback" not in err
