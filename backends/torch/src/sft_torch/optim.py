"""The optimizer (`train.optimizer`) and the learning-rate schedule of a run.

    opt = build_optimizer(model, config.train)          # no weight decay on biases and norms

`adamw` is torch's AdamW; `adamw_8bit` / `paged_adamw_8bit` are bitsandbytes' (CUDA only, refused
at validation elsewhere); `adafactor` is transformers' Adafactor driven by this learning rate and
schedule (no relative step); `sgd` is torch's SGD with momentum betas[0].
    sched = build_scheduler(opt, config.train, total_steps=100)
    lr_factor(step=0, total=100, warmup=3, kind="cosine", min_ratio=0.1)   # 1/3

Warmup rises linearly from peak/warmup at the first step to the peak at step `warmup - 1`
(no step is wasted at lr 0), then `cosine` or `linear` decays to `min_lr_ratio` x peak at the
last step; `constant` stays at the peak.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from sft.specs import TrainSpec


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into decayed matrices and undecayed biases/norm scales."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, train: TrainSpec) -> torch.optim.Optimizer:
    groups, lr, name = param_groups(model, train.weight_decay), train.learning_rate, train.optimizer
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=train.betas, eps=train.eps)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if name == "adamw_8bit" else bnb.optim.PagedAdamW8bit
        opt: torch.optim.Optimizer = cls(groups, lr=lr, betas=train.betas, eps=train.eps)
        return opt
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # lr given, relative_step off: sft's warmup and schedule drive it like the others
        return Adafactor(
            groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False
        )
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=train.betas[0])
    raise ValueError(f"train.optimizer: unknown optimizer {name!r}")


def warmup_steps(train: TrainSpec, total: int) -> int:
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


def build_scheduler(
    opt: torch.optim.Optimizer, train: TrainSpec, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    fn = partial(
        lr_factor,
        total=total_steps,
        warmup=warmup_steps(train, total_steps),
        kind=train.lr_scheduler,
        min_ratio=train.min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(opt, fn)
