"""The TensorBoard plugin: lifecycle hooks -> RUN_DIR/tensorboard/ events, read back with
TensorBoard's own EventAccumulator.

    $ .venvs/torch/bin/python -m pytest tests/plugins/test_tensorboard.py
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("sft_tensorboard")

from sft.events import RunEvents
from sft.plugins import get_plugins
from sft.specs import RunConfig

pytestmark = pytest.mark.torch  # tensorboard is installed in the torch venv


def run_events(tmp_path, tensorboard: bool) -> RunEvents:
    config = RunConfig.model_validate(
        {"data": {"train": "train.jsonl"}, "logging": {"tensorboard": tensorboard}}
    )
    return RunEvents(config, tmp_path, get_plugins().hook)


def test_metrics_are_written_as_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = run_events(tmp_path, tensorboard=True)
    events.train_start({"params": 1000, "trainable": 10})
    events.log(1, {"loss": 2.5, "lr": 1e-4, "tokens_per_s": 300.0})
    events.log(2, {"loss": 1.75, "lr": 2e-4, "tokens_per_s": 310.0})
    events.log(2, {"eval_loss": 1.9, "eval_perplexity": 6.69})
    events.train_end({"steps": 2, "final_loss": 1.75})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/loss"} <= set(tags)
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5), (2, 1.75)]
    assert acc.Scalars("eval/loss")[0].value == pytest.approx(1.9)
    assert acc.Scalars("train/final_loss")[0].value == 1.75
    assert "run/info" in acc.Tags()["tensors"]


def test_disabled_by_logging_tensorboard_false(tmp_path):
    events = run_events(tmp_path, tensorboard=False)
    events.train_start({})
    events.log(1, {"loss": 1.0})
    events.train_end({"steps": 1, "final_loss": 1.0})
    assert not (tmp_path / "tensorboard").exists()
    assert (tmp_path / "metrics.jsonl").is_file()


def test_loading_the_plugin_does_not_import_tensorboard():
    code = (
        "import sys; from sft.plugins import get_plugins; get_plugins(); "
        "import sft_tensorboard.plugin; print('tensorboard' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_resumed_run_replaces_the_killed_runs_later_steps(tmp_path):
    """A run killed after step 5 whose last checkpoint is step 3: the resumed process logs 4..6
    again; TensorBoard must show each step once (the plugin's session-restart event)."""
    from sft_tensorboard import plugin
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    killed = run_events(tmp_path, tensorboard=True)
    killed.train_start({"resumed_at_step": 0})
    for step in range(1, 6):
        killed.log(step, {"loss": 10.0 + step})
    plugin._writers.pop(str(tmp_path.resolve()))  # the process died: its writer is gone
    resumed = run_events(tmp_path, tensorboard=True)
    resumed.restart(3)
    resumed.train_start({"resumed_at_step": 3})
    for step in range(4, 7):
        resumed.log(step, {"loss": 20.0 + step})
    resumed.train_end({"steps": 6, "final_loss": 26.0})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert got == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0), (6, 26.0)]
