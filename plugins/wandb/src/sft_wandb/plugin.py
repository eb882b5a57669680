"""Weights & Biases tracking for sft runs, from the lifecycle hooks (any backend).

    logging:
      trackers: [wandb]         # then every `sft run` writes RUN_DIR/wandb/offline-run-*/

Offline by default (nothing leaves the machine; `wandb sync RUN_DIR/wandb/offline-run-*`
uploads later); set `WANDB_MODE=online` (and log in) to stream instead. The project is
`$WANDB_PROJECT` or `sft`, the run is named after the run directory. Recorded: the resolved
spec as the run's config, every logged metric at its optimizer step, the final loss in the
run summary and `loss.png` + `summary.json` + `config.yaml` as an artifact `sft-outputs`.
wandb is imported only when a run starts; only the main process gets these hooks.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import sft
from sft import rundir

_runs: dict[str, Any] = {}
"""Open wandb runs by run directory (a process may run several jobs)."""


@sft.hookimpl
def sft_register_trackers(register: Any) -> None:
    register("wandb", "Weights & Biases (offline by default): config, metrics, outputs artifact")


@sft.hookimpl
def sft_train_start(config: Any, run_dir: str, info: dict[str, Any]) -> None:
    from sft.trackers import enabled

    if "wandb" not in enabled(config):
        return
    import wandb
    from sft.run import config_to_dict

    root = Path(run_dir).resolve()
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "sft"),
        name=root.name,
        dir=str(root),
        mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
        config={**config_to_dict(config), "info": _jsonable(info)},
        reinit="create_new",  # one wandb run per sft run, also when a process runs several
        settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
    )
    _runs[str(root)] = run


@sft.hookimpl
def sft_log_metrics(step: int, metrics: dict[str, float], run_dir: str) -> None:
    run = _runs.get(str(Path(run_dir).resolve()))
    if run is None:
        return
    values = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }
    if values:
        run.log(values, step=int(step))


@sft.hookimpl
def sft_train_end(config: Any, run_dir: str, summary: dict[str, Any]) -> None:
    import wandb

    root = Path(run_dir).resolve()
    run = _runs.pop(str(root), None)
    if run is None:
        return
    final = summary.get("final_loss")
    if isinstance(final, (int, float)) and math.isfinite(float(final)):
        run.summary["final_loss"] = float(final)
    run.summary["steps"] = summary.get("steps")
    artifact = wandb.Artifact("sft-outputs", type="run-outputs")
    for name in (rundir.LOSS_PLOT, rundir.SUMMARY, rundir.CONFIG):
        if (root / name).is_file():
            artifact.add_file(str(root / name))
    run.log_artifact(artifact)
    run.finish()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
