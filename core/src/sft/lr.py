"""The learning rate of every optimizer step, framework-free: the one schedule all backends follow.

The torch backend feeds `lr_factor` to a LambdaLR; the MindSpore backend configures MindFormers
with a schedule class that computes the same formula (`sft_mindspore.lr`), and the parity tests
compare both with `learning_rates` below.

    learning_rates(TrainSpec(learning_rate=1e-3, warmup_steps=2, lr_scheduler="linear"), total=5)
    # [0.0005, 0.001, 0.001, 0.0005, 0.0]

Warmup rises linearly from peak/warmup at the first step to the peak at step `warmup - 1` (no step
is wasted at lr 0), then `cosine` or `linear` decays to `min_lr_ratio` x peak at the last step;
`constant` stays at the peak. Steps are 0-based optimizer steps.
"""

from __future__ import annotations

import math
from typing import Any


def warmup_steps(train: Any, total: int) -> int:
    """`train.warmup_steps` (capped at the run's steps), else ceil(warmup_ratio x total)."""
    if train.warmup_steps is not None:
        return min(train.warmup_steps, total)
    return math.ceil(train.warmup_ratio * total)


def lr_factor(step: int, *, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / decay_steps)
    shape = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def learning_rates(train: Any, total: int) -> list[float]:
    """The learning rate of each of the run's `total` optimizer steps."""
    warmup = warmup_steps(train, total)
    return [
        train.learning_rate
        * lr_factor(
            s, total=total, warmup=warmup, kind=train.lr_scheduler, min_ratio=train.min_lr_ratio
        )
        for s in range(total)
    ]
