"""metrics.jsonl when a run restarts: `RunEvents.restart(step)` keeps only the rows of steps up
to the resumed checkpoint (a killed run's later rows and a torn last line go), atomically; and
core's `checkpoint.resume: auto` on a finished run returns its summary without training.

    $ .venvs/core/bin/python -m pytest tests/core/test_events_restart.py -q
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sft.events import RunEvents
from sft.run import finished_run, write_config
from sft.specs import RunConfig


class Hook:
    def __init__(self) -> None:
        self.logged: list[int] = []

    def sft_log_metrics(self, step: int, metrics: dict[str, Any], run_dir: str) -> None:
        self.logged.append(step)


def config(tmp_path: Path, **checkpoint: Any) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": "m",
            "data": {"train": "t.jsonl"},
            "output_dir": str(tmp_path / "run"),
            "checkpoint": checkpoint,
        }
    )


def test_restart_drops_rows_after_the_checkpoint_and_a_torn_line(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    events = RunEvents(cfg, run, Hook())
    for step in range(1, 6):
        events.log(step, {"loss": float(step)})
    events.log(3, {"eval_loss": 1.0})
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # the killed process was writing this line
    events.restart(3)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "loss" in r) for r in rows] == [(1, True), (2, True), (3, True), (3, False)]
    events.log(4, {"loss": 4.5})
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3, 4]
    assert not list(run.glob(".metrics.jsonl.tmp*"))
    events.restart(0)  # a fresh run in the same directory starts an empty file
    assert (run / "metrics.jsonl").read_text() == ""


def test_resume_auto_on_a_finished_run_returns_its_summary(tmp_path: Path, capsys) -> None:
    first = config(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    write_config(first, run / "config.yaml")
    assert finished_run(config(tmp_path, resume="auto")) is None  # no summary: not finished
    (run / "summary.json").write_text(json.dumps({"steps": 7, "final_loss": 1.25}))
    assert finished_run(first) is None  # no resume asked: train again
    summary = finished_run(config(tmp_path, resume="auto"))
    assert summary == {"steps": 7, "final_loss": 1.25}
    assert f"{run} already finished (7 steps, final loss 1.25)" in capsys.readouterr().err
    changed = RunConfig.model_validate(
        {
            **json.loads(first.model_dump_json()),
            "checkpoint": {"resume": "auto"},
            "train": {**json.loads(first.model_dump_json())["train"], "max_steps": 99},
        }
    )
    assert finished_run(changed) is None  # more steps asked for: resume and train them
