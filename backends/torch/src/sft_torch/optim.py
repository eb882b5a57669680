"""AdamW and the learning-rate schedule of a run.

    opt = build_optimizer(model, config.train)          # no weight decay on biases and norms
    sched = build_scheduler(opt, config.train, total_steps=100)
    lr_factor(step=0, total=100, warmup=3, kind="cosine", min_ratio=0.1)   # 1/3

The schedule itself (`lr_factor`, `warmup_steps`) is core's `sft.lr`, shared with the MindSpore
backend so both train every step at the same learning rate.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from sft.lr import lr_factor, warmup_steps
from sft.specs import TrainSpec

__all__ = ["build_optimizer", "build_scheduler", "lr_factor", "param_groups", "warmup_steps"]


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
    return torch.optim.AdamW(
        param_groups(model, train.weight_decay),
        lr=train.learning_rate,
        betas=train.betas,
        eps=train.eps,
    )


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
