"""sft's learning-rate schedule as a MindFormers LR class, so MindFormers trains every optimizer step
at the lr the torch backend uses (core's `sft.lr.lr_factor`).

MindFormers' own CosineWithWarmUpLR / LinearWithWarmUpLR count warmup from step 0 (the first step
trains at lr 0) and cannot hold the peak for the step after warmup as sft's schedule does, and
LinearWithWarmUpLR has no final lr; so sft registers this class and writes it into the YAML:

    lr_schedule: {type: SftWarmUpDecayLR, learning_rate: 2e-4, total_steps: 100,
                  warmup_steps: 3, kind: cosine, min_lr_ratio: 0.0}

Importing this module registers the class (sft's worker script does; to run the YAML with
MindFormers' run_mindformer.py, `import sft_mindspore.lr` first).

    >>> SftWarmUpDecayLR(1e-3, total_steps=5, warmup_steps=2, kind="linear")(Tensor(0))  # 5e-4
"""

from __future__ import annotations

import math
from typing import Any

import mindspore.common.dtype as mstype
import mindspore.ops as ops
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindspore.common.tensor import Tensor
from mindspore.nn.learning_rate_schedule import LearningRateSchedule

KINDS = ("cosine", "linear", "constant")


@MindFormerRegister.register(MindFormerModuleType.LR)
class SftWarmUpDecayLR(LearningRateSchedule):
    """lr(step) = learning_rate x sft.lr.lr_factor(step, ...), step = the optimizer's 0-based
    global step. MindFormers passes further lr_schedule keys (warmup_ratio ...): ignored."""

    def __init__(
        self,
        learning_rate: float,
        total_steps: int,
        warmup_steps: int = 0,
        kind: str = "cosine",
        min_lr_ratio: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"SftWarmUpDecayLR: kind {kind!r} is not one of {KINDS}")
        self.learning_rate = float(learning_rate)
        self.kind = kind
        self.min_ratio = float(min_lr_ratio)
        self.warmup = Tensor(float(warmup_steps), mstype.float32)
        self.decay_steps = Tensor(float(max(1, total_steps - warmup_steps - 1)), mstype.float32)
        self.cast = ops.Cast()

    def construct(self, global_step: Any) -> Any:
        step = self.cast(global_step, mstype.float32)
        # max(warmup, 1) only keeps the unused branch finite when there is no warmup
        warm = (step + 1.0) / ops.maximum(self.warmup, 1.0)
        progress = ops.clamp((step - self.warmup) / self.decay_steps, 0.0, 1.0)
        if self.kind == "constant":
            shape = ops.ones_like(progress)
        elif self.kind == "linear":
            shape = 1.0 - progress
        else:  # 0.5 (1 + cos(pi p)) written without float32's cancellation near the end
            shape = ops.square(ops.cos(0.5 * math.pi * progress))
        decayed = self.min_ratio + (1.0 - self.min_ratio) * shape
        factor = ops.select(step < self.warmup, warm, decayed)
        return self.learning_rate * factor
