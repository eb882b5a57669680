"""sft's MindFormers callback for preemption: MindFormers' CheckpointMonitor, plus a resumable
checkpoint at the first step boundary after SIGTERM or SIGINT, after which training stops.

sft's entry script imports this module (which registers the class with MindFormers) and uses it
in place of the YAML's CheckpointMonitor; the worker then exits 143 (SIGTERM) or 130 (SIGINT),
and `sft run` reports the checkpoint to resume from. The YAML itself stays plain MindFormers.

    callbacks: [{type: SftCheckpointMonitor, prefix: sft, save_checkpoint_steps: 100, ...}]
"""

from __future__ import annotations

from typing import Any

from mindformers.core.callback.callback import CheckpointMonitor
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from sft.guard import StopSignals

#: Entered by the entry script around training (signal handlers live in the main thread).
STOP = StopSignals()


@MindFormerRegister.register(MindFormerModuleType.CALLBACK)
class SftCheckpointMonitor(CheckpointMonitor):  # type: ignore[misc]
    """CheckpointMonitor that saves and stops at the step boundary after a stop signal."""

    def on_train_step_end(self, run_context: Any) -> None:
        super().on_train_step_end(run_context)  # the regular every-N-steps checkpoint
        if STOP.requested is None:
            return
        cb_params = run_context.original_args()
        # force_to_save; a no-op when this step's checkpoint was just written
        self._save_ckpt(cb_params, force_to_save=True)
        print(
            f"[sft] {STOP.requested}: checkpoint of step {cb_params.cur_step_num} written; "
            "stopping",
            flush=True,
        )
        run_context.request_stop()


def use_sft_monitor(config: Any) -> bool:
    """Replace the config's CheckpointMonitor by SftCheckpointMonitor; False if it has none."""
    found = False
    for cb in getattr(config, "callbacks", None) or []:
        if cb.get("type") == "CheckpointMonitor":
            cb["type"] = "SftCheckpointMonitor"
            found = True
    return found
