"""MLflow tracking for sft runs, from the lifecycle hooks (any backend).

    logging:
      trackers: [mlflow]        # then every `sft run` records one MLflow run

Where: `$MLFLOW_TRACKING_URI` when set (a server, or `sqlite:///path/mlflow.db` shared by many
runs), else `sqlite:///RUN_DIR/mlflow.db` with artifacts in RUN_DIR/mlflow-artifacts/. The
experiment is `$MLFLOW_EXPERIMENT_NAME` or `sft`; the MLflow run is named after the run
directory. Recorded: the resolved spec as params (dotted keys, `train.learning_rate`), every
logged metric at its optimizer step, and at the end `loss.png`, `summary.json` and
`config.yaml` as artifacts with the final loss as a metric. mlflow is imported only when a run
starts, so loading the plugin costs nothing; only the main process gets these hooks.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, TypeGuard

import sft
from sft import rundir

_runs: dict[str, tuple[Any, str]] = {}
"""(MlflowClient, MLflow run id) by run directory (a process may run several jobs)."""

MAX_PARAM = 6000  # MLflow's limit on a param value's length


@sft.hookimpl
def sft_register_trackers(register: Any) -> None:
    register("mlflow", "MLflow: params, metrics per step, loss plot and summary artifacts")


def tracking_uri(run_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir / 'mlflow.db'}"


@sft.hookimpl
def sft_train_start(config: Any, run_dir: str, info: dict[str, Any]) -> None:
    from sft.trackers import enabled

    if "mlflow" not in enabled(config):
        return
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient
    from sft.run import config_to_dict

    root = Path(run_dir).resolve()
    client = MlflowClient(tracking_uri=tracking_uri(root))
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "sft")
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        exp_id = exp.experiment_id
    elif "MLFLOW_TRACKING_URI" in os.environ:  # the server decides where artifacts go
        exp_id = client.create_experiment(name)
    else:
        exp_id = client.create_experiment(name, artifact_location=str(root / "mlflow-artifacts"))
    run = client.create_run(exp_id, run_name=root.name, tags={"sft.backend": config.backend})
    params = [Param(k, v) for k, v in flatten(config_to_dict(config)).items()]
    params += [Param(f"info.{k}", _text(v)) for k, v in info.items() if _scalar(v)]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    _runs[str(root)] = (client, run.info.run_id)


@sft.hookimpl
def sft_log_metrics(step: int, metrics: dict[str, float], run_dir: str) -> None:
    found = _runs.get(str(Path(run_dir).resolve()))
    if found is None:
        return
    from mlflow.entities import Metric

    client, run_id = found
    now = int(time.time() * 1000)
    rows = [
        Metric(k, float(v), now, int(step))
        for k, v in metrics.items()
        if _number(v) and math.isfinite(float(v))  # MLflow stores no NaN for a skipped step
    ]
    if rows:
        client.log_batch(run_id, metrics=rows)


@sft.hookimpl
def sft_train_end(config: Any, run_dir: str, summary: dict[str, Any]) -> None:
    root = Path(run_dir).resolve()
    found = _runs.pop(str(root), None)
    if found is None:
        return
    client, run_id = found
    final = summary.get("final_loss")
    if _number(final) and math.isfinite(float(final)):
        client.log_metric(run_id, "final_loss", float(final), step=int(summary.get("steps", 0)))
    client.log_dict(run_id, json.loads(json.dumps(summary, default=str)), rundir.SUMMARY)
    for name in (rundir.LOSS_PLOT, rundir.CONFIG):
        if (root / name).is_file():
            client.log_artifact(run_id, str(root / name))
    client.set_terminated(run_id, "FINISHED")


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """`{"train": {"learning_rate": 2e-4}}` -> `{"train.learning_rate": "0.0002"}`; lists and
    other leaves as JSON text (a mapping that is empty stays one param)."""
    if isinstance(data, dict) and data:
        out: dict[str, str] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): _text(data)}


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_PARAM]


def _number(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None
