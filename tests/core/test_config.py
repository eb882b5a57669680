"""The job spec and its loader: every mistake reported at once, with key paths and suggestions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sft.config import apply_overrides, load_config
from sft.errors import ConfigError


def write(tmp_path: Path, data: dict) -> Path:
    (tmp_path / "train.jsonl").write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ]
            }
        )
        + "\n"
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {"backend": "example", "data": {"train": "train.jsonl"}}


def test_minimal_config_fills_defaults_and_resolves_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.method.name == "lora" and cfg.method.r == 16
    assert cfg.data.train[0].path == str(tmp_path / "train.jsonl")
    assert cfg.output_dir and cfg.output_dir.endswith(f"runs/{tmp_path.name}-job")


def test_three_mistakes_reported_together(tmp_path: Path) -> None:
    data = {**BASE, "trian": {"epochs": 1}, "method": {"name": "qlora", "r": 8}}
    data["train"] = {"learning_rate": 5.0}
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data))
    text = str(info.value)
    paths = {p.path for p in info.value.problems}
    assert {"trian", "train.learning_rate", "method.name"} <= paths, text
    assert "did you mean 'train'?" in text
    assert "does not support method 'qlora'" in text
    assert "less than 1" in text


def test_cli_exit_code_2_without_traceback(tmp_path: Path) -> None:
    data = {**BASE, "trian": {}, "train": {"micro_batch_size": 0}, "method": "qlora"}
    proc = subprocess.run(
        [sys.executable, "-m", "sft", "config", "validate", "--config", str(write(tmp_path, data))],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in ("trian", "train.micro_batch_size", "method.name", "did you mean 'train'?"):
        assert needle in proc.stderr


def test_unknown_method_and_backend_suggestions(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {**BASE, "backend": "exampel", "method": "lorra"}))
    text = str(info.value)
    assert "did you mean 'example'?" in text
    assert "did you mean 'lora'?" in text


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, BASE),
        [
            "train.learning_rate=1e-4",
            "method.target_modules=[q_proj, v_proj]",
            "data.packing=false",
        ],
    )
    assert cfg.train.learning_rate == 1e-4
    assert cfg.method.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.packing is False


def test_override_through_a_value_is_a_problem() -> None:
    data = {"train": 3}
    problems = apply_overrides(data, ["train.epochs=2", "novalue"])
    assert [p.path for p in problems] == ["train", "novalue"]


def test_missing_data_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {**BASE, "data": {"train": "nope/*.jsonl"}}))
    assert "data.train.path" in str(info.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  train: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "bad.yaml:" in str(info.value) and "invalid YAML" in str(info.value)


def test_backend_section_validated_by_its_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {**BASE, "example": {"fail_onn": "none"}}))
    assert "example.fail_onn" in str(info.value) and "did you mean 'fail_on'?" in str(info.value)
    cfg = load_config(write(tmp_path, {**BASE, "example": {"fail_on": "none"}}))
    assert cfg.options == {"fail_on": "none"}


def test_global_batch_consistency(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            write(tmp_path, {**BASE, "train": {"micro_batch_size": 3, "global_batch_size": 8}})
        )
    assert "not a multiple" in str(info.value)
    cfg = load_config(
        write(tmp_path, {**BASE, "train": {"micro_batch_size": 2, "global_batch_size": 8}})
    )
    assert cfg.train.accumulation(1) == 4 and cfg.train.accumulation(2) == 2


def test_schema_and_explain_come_from_field_docs(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sft", "config", "schema"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    schema = json.loads(out)
    assert "Peak learning rate." in json.dumps(schema)
    out = subprocess.run(
        [sys.executable, "-m", "sft", "config", "explain", "train"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "learning_rate: float = 0.0002" in out and "Peak learning rate." in out
