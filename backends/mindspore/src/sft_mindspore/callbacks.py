"""sft's MindFormers callback for preemption: MindFormers' CheckpointMonitor, plus a resumable
checkpoint at the first step boundary after SIGTERM or SIGINT, after which training stops.

sft's worker script imports this module and registers the class under the name
`CheckpointMonitor` (`use_sft_monitor`), so the YAML's CheckpointMonitor is built as this class
with MindFormers' resume arguments; the worker then exits 143 (SIGTERM) or 130 (SIGINT),
and `sft run` reports the checkpoint to resume from. The YAML itself stays plain MindFormers.

With several workers (msrun, rank tables: RANK_SIZE > 1 and SFT_STOP_DIR set by `sft run`) the
ranks first agree on one stop step through `sft_mindspore.stopfile` (the step after the one
where the first rank saw the stop), so all of them checkpoint the same step and none waits in
an all-reduce the others never join.

    callbacks: [{type: CheckpointMonitor, prefix: sft, save_checkpoint_steps: 100, ...}]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mindformers.core.callback.callback import CheckpointMonitor
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from sft.guard import StopSignals

from sft_mindspore.stopfile import StopFiles

#: Entered by the worker script around training (signal handlers live in the main thread).
STOP = StopSignals()
#: The stop agreement of several workers; None for one worker (it stops at its own signal).
AGREE = StopFiles.from_env() if int(os.environ.get("RANK_SIZE", "1")) > 1 else None
#: (signal name, step) this worker checkpointed and stopped at, set by the callback.
STOPPED: list[tuple[str, int]] = []


@MindFormerRegister.register(MindFormerModuleType.CALLBACK)
class SftCheckpointMonitor(CheckpointMonitor):  # type: ignore[misc]
    """CheckpointMonitor that saves and stops at the step boundary after a stop signal."""

    def on_train_step_end(self, run_context: Any) -> None:
        super().on_train_step_end(run_context)  # the regular every-N-steps checkpoint
        cb_params = run_context.original_args()
        # cur_step_num counts this launch's steps; a resumed launch adds the checkpoint's step
        step = int(getattr(self, "_append_step_num", 0) or 0) + int(cb_params.cur_step_num)
        signame = STOP.requested if AGREE is None else AGREE.should_stop(step, STOP.requested)
        if signame is None:
            return
        # force_to_save; a no-op when this step's checkpoint was just written
        self._save_ckpt(cb_params, force_to_save=True)
        STOPPED.append((signame, step))
        print(f"[sft] {signame}: checkpoint of step {step} written; stopping", flush=True)
        run_context.request_stop()

    def record_last_ckpt_to_json(self, epoch: int, step: int, ckpt_file: str) -> None:
        """meta.json plus `sft_global_step`: MindFormers' `last_step` counts the steps of this
        launch (after a resume it starts again from 1), so a second resume read the wrong step
        from it (the console, and metrics.jsonl cut back too far: a gap)."""
        super().record_last_ckpt_to_json(epoch, step, ckpt_file)
        meta = json.loads(Path(self.meta_json).read_text())
        meta["sft_global_step"] = int(getattr(self, "_append_step_num", 0) or 0) + int(step)
        tmp = Path(self.meta_json).with_suffix(".sft.tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.meta_json)


def use_sft_monitor(config: Any) -> bool:
    """Build the config's CheckpointMonitor as SftCheckpointMonitor; False if it has none.

    The class is registered under MindFormers' own name instead of renaming the YAML's type:
    MindFormers' trainer passes its resume state (`append_info`: the step and epoch a resumed
    launch starts from, written into every checkpoint) only to a callback typed
    `CheckpointMonitor`; under another type a resumed launch saved launch-local step numbers,
    and a second resume restarted the data and lr schedule at the wrong step."""
    found = any(
        cb.get("type") == "CheckpointMonitor" for cb in getattr(config, "callbacks", None) or []
    )
    if found:
        MindFormerRegister.register_cls(
            SftCheckpointMonitor, MindFormerModuleType.CALLBACK, alias="CheckpointMonitor"
        )
    return found
