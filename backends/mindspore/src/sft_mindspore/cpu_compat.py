"""CPU compatibility for MindFormers 1.9.0's legacy llama trainer: the documented workarounds.

MindFormers targets Ascend; its legacy llama trainer trips over four Ascend-only paths on CPU.
Each workaround below is minimal and applied ONLY when `device_target` is CPU, so on Ascend the
trainer runs unmodified. (User-facing summary: docs/mindspore.md, "CPU vs Ascend".)

1. rotary embedding `BatchMatMul ... cannot be broadcast on CPU`  -> `use_rope_slice: True`
2. `Unsupported op [RmsNorm] on CPU`                            -> `fused_rms_norm: False`
   (and no bf16 on CPU: bf16 Transpose has no CPU kernel; `runtime` refuses it)
3. the train step's overflow check uses Ascend float-status ops  -> an `isfinite` check on the
   gradients, written with ops that exist on CPU
4. `Unsupported op [Barrier] on CPU` with `use_parallel: True`   -> barrier becomes a no-op (the
   CPU collective backend synchronizes in its collectives; checkpoint I/O is per rank)
5. data parallel on CPU is MindSpore's plain DATA_PARALLEL mode, where `calculate_per_token_loss`
   divides each rank's gradient by its OWN trained tokens and the reducer then averages ranks (a
   mean of per-rank means; on Ascend, semi-auto parallel computes one loss over the global batch)
   -> the divisor becomes all ranks' trained tokens / ranks, so the averaged gradient is the
   global token mean, as the torch backend's

    from sft_mindspore.cpu_compat import cpu_model_config, apply_runtime_patches
    model_config.update(cpu_model_config())      # 1, 2 (at YAML generation time)
    apply_runtime_patches("CPU")                 # 3, 4 (in the worker script, before training)
"""

from __future__ import annotations

from typing import Any


def cpu_model_config() -> dict[str, Any]:
    """Workarounds 1 and 2: model_config keys for a CPU run."""
    return {
        "use_rope_slice": True,
        "fused_rms_norm": False,
        "use_flash_attention": False,
    }


def apply_runtime_patches(device_target: str) -> list[str]:
    """Workarounds 3 and 4; returns what was patched (logged by the worker script)."""
    if device_target != "CPU":
        return []
    return [_patch_overflow_check(), _patch_barrier(), _patch_data_parallel_token_mean()]


def _patch_overflow_check() -> str:
    import mindspore.ops as ops
    from mindformers.wrapper.wrapper import MFTrainOneStepCell

    original_init = MFTrainOneStepCell.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        # The base class picks Ascend status ops from these flags; CPU has neither.
        self.ascend_910a_target = False
        self.ascend_910b_target = False
        self.gpu_target = False

    def get_overflow_status(self: Any, status: Any, compute_output: Any) -> Any:
        # A real check (any non-finite gradient = overflow) with ops CPU implements.
        finite = [ops.isfinite(g).all() for g in compute_output]
        return ops.logical_not(ops.stack(finite).all())

    MFTrainOneStepCell.__init__ = __init__
    MFTrainOneStepCell.get_overflow_status = get_overflow_status
    return "MFTrainOneStepCell.get_overflow_status: isfinite over gradients"


def _patch_barrier() -> str:
    import mindformers.trainer.utils as trainer_utils
    import mindformers.utils.load_checkpoint_utils as ckpt_utils
    import mindformers.version_control as version_control
    import mindspore.communication.comm_func as comm_func

    def barrier(*_: Any, **__: Any) -> None:
        return None

    for module in (comm_func, trainer_utils, ckpt_utils, version_control):
        if hasattr(module, "barrier"):
            module.barrier = barrier
    return "barrier: no-op"


def _patch_data_parallel_token_mean() -> str:
    import mindspore.ops as ops
    from mindformers.wrapper.wrapper import MFTrainOneStepCell

    original_init = MFTrainOneStepCell.__init__
    original_grads = MFTrainOneStepCell.grads_for_legacy

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.sft_token_mean = bool(self.calculate_per_token_loss and self.reducer_flag)
        if self.sft_token_mean:
            self.sft_all_reduce = ops.AllReduce()

    def grads_for_legacy(self: Any, scaling_sens: Any, *inputs: Any) -> Any:
        loss, grads, factor = original_grads(self, scaling_sens, *inputs)
        if self.sft_token_mean:
            # grads / (sum of all ranks' tokens / ranks), then the reducer's mean over ranks
            factor = self.sft_all_reduce(factor) / self.degree
        return loss, grads, factor

    MFTrainOneStepCell.__init__ = __init__
    MFTrainOneStepCell.grads_for_legacy = grads_for_legacy
    return "MFTrainOneStepCell: data-parallel gradients normalised by all ranks' trained tokens"
