"""TensorBoard events for every sft run, from the lifecycle hooks (any backend).

    $ pip install -e plugins/tensorboard        # then every `sft run` writes RUN_DIR/tensorboard/
    $ tensorboard --logdir runs/                # loss, lr, grad_norm, tokens_per_s, eval_loss ...

On by default (`logging.trackers` unset); turn it off with `logging.trackers: []` (or the older
`logging.tensorboard: false`), or name the trackers you want: `logging.trackers: [tensorboard,
mlflow]`. The writer (tensorboard's own, no torch)
is imported only when a run starts, so loading the plugin costs nothing. Only the main process
gets these hooks, so multi-process runs write one event stream.
"""

from __future__ import annotations

import json
import os
from typing import Any

import sft

_writers: dict[str, Any] = {}
"""Open writers by run directory (a process may run more than one job, e.g. in tests)."""


def _writer(run_dir: str) -> Any:
    return _writers.get(os.path.abspath(run_dir))


@sft.hookimpl
def sft_register_trackers(register: Any) -> None:
    register("tensorboard", "TensorBoard event files in RUN_DIR/tensorboard/")


@sft.hookimpl
def sft_train_start(config: Any, run_dir: str, info: dict[str, Any]) -> None:
    from sft.trackers import enabled

    if "tensorboard" not in enabled(config):
        return
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    key = os.path.abspath(run_dir)
    resumed = int(info.get("resumed_at_step") or 0)
    if key in _writers:  # a resumed run in the same process: keep appending
        if resumed:
            _writers[key].add_event(_restart_event(resumed))
        return
    _writers[key] = writer = EventFileWriter(os.path.join(run_dir, "tensorboard"))
    if resumed:
        writer.add_event(_restart_event(resumed))
    text = json.dumps({k: v for k, v in info.items() if _jsonable(v)}, indent=2, default=str)
    writer.add_event(_text_event("run/info", f"```\n{text}\n```", step=0))


@sft.hookimpl
def sft_log_metrics(step: int, metrics: dict[str, float], run_dir: str) -> None:
    writer = _writer(run_dir)
    if writer is None:
        return
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_event(_scalar_event(_tag(name), float(value), step))
    writer.flush()


@sft.hookimpl
def sft_train_end(config: Any, run_dir: str, summary: dict[str, Any]) -> None:
    writer = _writers.pop(os.path.abspath(run_dir), None)
    if writer is None:
        return
    final = summary.get("final_loss")
    if isinstance(final, (int, float)):
        writer.add_event(_scalar_event("train/final_loss", float(final), summary.get("steps", 0)))
    writer.close()


def _tag(name: str) -> str:
    # eval_loss -> eval/loss; everything else under train/ so TensorBoard groups the charts.
    if name.startswith("eval_"):
        return "eval/" + name[len("eval_") :]
    return "train/" + name


def _jsonable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, list, dict)) or value is None


def _scalar_event(tag: str, value: float, step: int) -> Any:
    import time

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary(value=[Summary.Value(tag=tag, simple_value=value)])
    return Event(wall_time=time.time(), step=int(step), summary=summary)


def _restart_event(resumed_at: int) -> Any:
    """A session restart at the step after the resumed checkpoint: TensorBoard then discards
    the events of steps >= it that a killed process wrote (its purge of orphaned data), so the
    charts show each step once, as metrics.jsonl does."""
    import time

    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    start = SessionLog(status=SessionLog.START)
    return Event(wall_time=time.time(), step=resumed_at + 1, session_log=start)


def _text_event(tag: str, text: str, step: int) -> Any:
    import time

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
    tensor = TensorProto(
        dtype=7,
        string_val=[text.encode()],  # 7 = DT_STRING
        tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]),
    )
    value = Summary.Value(tag=tag, metadata=meta, tensor=tensor)
    return Event(wall_time=time.time(), step=int(step), summary=Summary(value=[value]))
