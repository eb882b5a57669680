"""Experiment trackers as plugins: a real tiny torch run with `logging.trackers: [mlflow, wandb]`,
read back with MLflow's own client and with wandb's own reader of its offline run file; and the
config errors for a tracker that is not installed.

    $ .venvs/torch/bin/python -m pytest tests/plugins/test_trackers.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sft.config import load_config
from sft.errors import ConfigError
from sft.plugins import Plugins
from sft.run import config_to_dict


def _job(tmp_path: Path, model: Path, trackers: list[str]) -> Path:
    from tests.backends.torch.test_sft_run import write_job  # imports torch

    path = write_job(tmp_path, model)
    job = yaml.safe_load(path.read_text())
    job["train"]["max_steps"] = 3
    job.pop("checkpoint")
    job["logging"] = {"progress": False, "trackers": trackers}
    path.write_text(yaml.safe_dump(job))
    return path


def _flat(data: dict, prefix: str = "") -> dict[str, str]:
    from sft_mlflow.plugin import flatten

    return flatten(data, prefix)


@pytest.mark.torch
@pytest.mark.slow
def test_a_run_is_recorded_in_mlflow_and_wandb_offline(tmp_path, tiny_llama, monkeypatch):
    pytest.importorskip("sft_mlflow")
    pytest.importorskip("sft_wandb")
    from mlflow.tracking import MlflowClient
    from sft.run import run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = load_config(_job(tmp_path, tiny_llama, ["mlflow", "wandb"]))
    summary = run(config)
    run_dir = tmp_path / "run"
    assert not (run_dir / "tensorboard").exists()  # not named in trackers
    metrics = [r for r in map(json.loads, (run_dir / "metrics.jsonl").open()) if "loss" in r]
    assert [r["step"] for r in metrics] == [1, 2, 3]

    # MLflow: read back through its client from the run directory's sqlite store
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    [ml] = client.search_runs([client.get_experiment_by_name("sft").experiment_id])
    assert ml.info.status == "FINISHED" and ml.info.run_name == "run"
    params = ml.data.params
    expected = _flat(config_to_dict(config))
    assert {k: params[k] for k in expected} == expected  # the resolved spec, every leaf
    assert params["train.learning_rate"] == "0.005" and params["logging.trackers"] == (
        '["mlflow", "wandb"]'
    )
    history = client.get_metric_history(ml.info.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (r["step"], pytest.approx(r["loss"])) for r in metrics
    ]
    assert ml.data.metrics["final_loss"] == pytest.approx(summary["final_loss"])
    names = {a.path for a in client.list_artifacts(ml.info.run_id)}
    assert {"loss.png", "summary.json", "config.yaml"} <= names
    local = Path(client.download_artifacts(ml.info.run_id, "summary.json", str(tmp_path)))
    assert json.loads(local.read_text())["steps"] == 3

    # W&B: the offline run file, read with wandb's own datastore reader
    records = read_wandb_offline(run_dir)
    [wb] = records["run"]
    wb_config = {_key(i): json.loads(i.value_json) for i in wb.config.update}
    assert wb.display_name == "run" and wb.project == "sft"
    assert wb_config["train"]["learning_rate"] == 0.005
    assert wb_config["model"]["name_or_path"] == str(tiny_llama)
    history = [{_key(i): json.loads(i.value_json) for i in r.item} for r in records["history"]]
    losses = [(h["_step"], h["loss"]) for h in history if "loss" in h]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in metrics]
    summ = {_key(i): json.loads(i.value_json) for r in records["summary"] for i in r.update}
    assert summ["final_loss"] == pytest.approx(summary["final_loss"])
    [artifact] = [r for r in records["artifact"]]
    assert artifact.name == "sft-outputs"
    assert {m.path for m in artifact.manifest.contents} == {
        "loss.png",
        "summary.json",
        "config.yaml",
    }


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)


def read_wandb_offline(run_dir: Path) -> dict[str, list]:
    """Records of the one offline run under RUN_DIR/wandb, by kind (config, history, ...),
    parsed with wandb's own protobuf `Record`. wandb 0.31 no longer ships a Python reader of
    its run file (its Go core writes it), so the framing is read here: a 7-byte header
    (`:W&B`, magic 0xBEE1, version 0), then LevelDB-log blocks of 32 KiB whose chunks carry
    crc32c (4 bytes), length (2) and type (1: full, 2: first, 3: middle, 4: last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    [path] = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    raw = path.read_bytes()
    assert struct.unpack("<4sHB", raw[:7]) == (b":W&B", 0xBEE1, 0)
    out: dict[str, list] = {}
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0:
            break
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            pending = b""
            which = rec.WhichOneof("record_type")
            out.setdefault(which, []).append(getattr(rec, which))
    return out


def test_a_tracker_that_is_not_installed_is_a_config_error_with_its_install(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hi"}\n')
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {"data": {"train": str(data)}, "logging": {"trackers": ["mlflow", "wandbb"]}}
        )
    )
    with pytest.raises(ConfigError) as err:
        load_config(job, plugins=Plugins(autoload=False))
    text = str(err.value)
    assert "logging.trackers: 'mlflow' is not installed" in text
    assert "pip install -e plugins/mlflow" in text
    assert "unknown tracker 'wandbb' (did you mean 'wandb'?" in text


def test_logging_tensorboard_false_contradicting_trackers_is_refused(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hi"}\n')
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "data": {"train": str(data)},
                "logging": {"trackers": ["tensorboard"], "tensorboard": False},
            }
        )
    )
    with pytest.raises(ConfigError, match=r"logging\.tensorboard: is false but logging\.trackers"):
        load_config(job, plugins=Plugins(autoload=False))


@pytest.mark.parametrize("module", ["sft_mlflow.plugin", "sft_wandb.plugin"])
def test_loading_a_tracker_plugin_imports_no_tracker_library(module):
    pytest.importorskip(module.split(".")[0])
    code = (
        f"import sys; from sft.plugins import get_plugins; get_plugins(); import {module}; "
        "print(sorted(m for m in ('mlflow', 'wandb') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
