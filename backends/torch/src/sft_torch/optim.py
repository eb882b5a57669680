"""The optimizer (`train.optimizer`) and the learning-rate schedule of a run.

    opt = build_optimizer(model, config.train)          # no weight decay on biases and norms;
                                                        # CompensatedAdamW for bf16 parameters

`adamw` is torch's AdamW (CompensatedAdamW below when parameters train in bf16);
`adamw_8bit` / `paged_adamw_8bit` are bitsandbytes' (CUDA only, refused at validation
elsewhere); `adafactor` is transformers' Adafactor driven by this learning rate and schedule (no
relative step); `sgd` is torch's SGD with momentum betas[0].
    sched = build_scheduler(opt, config.train, total_steps=100)
    lr_factor(step=0, total=100, warmup=3, kind="cosine", min_ratio=0.1)   # 1/3

The schedule itself (`lr_factor`, `warmup_steps`) is core's `sft.lr`, shared with the MindSpore
backend so both train every step at the same learning rate.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, cast

import torch
from sft.lr import lr_factor, warmup_steps
from sft.specs import TrainSpec

__all__ = ["build_optimizer", "build_scheduler", "lr_factor", "param_groups", "warmup_steps"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into decayed matrices and undecayed biases/norm scales."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _, p in model.named_parameters():
        if p.requires_grad:
            # ds_shape: a ZeRO-3 parameter built partitioned holds an empty 1-D placeholder
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, train: TrainSpec) -> torch.optim.Optimizer:
    """`train.optimizer` over the trainable parameters. `adamw`: torch's AdamW when every
    trained parameter is fp32 (the default: fp32 master weights); `CompensatedAdamW` when some
    train in bf16 (pure-bf16 training, `model.dtype: bfloat16`), where torch's AdamW would
    round most small updates away."""
    groups, lr, name = param_groups(model, train.weight_decay), train.learning_rate, train.optimizer
    if name == "adamw":
        low = any(p.dtype != torch.float32 for g in groups for p in g["params"])
        cls = CompensatedAdamW if low else torch.optim.AdamW
        return cls(groups, lr=lr, betas=train.betas, eps=train.eps)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        bnb_cls = bnb.optim.AdamW8bit if name == "adamw_8bit" else bnb.optim.PagedAdamW8bit
        opt: torch.optim.Optimizer = bnb_cls(groups, lr=lr, betas=train.betas, eps=train.eps)
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


class CompensatedAdamW(torch.optim.Optimizer):
    """AdamW for bf16 (or fp16) parameters with Kahan-compensated updates.

    Adding an update to a bf16 weight rounds it to 8 significant bits: an update below half a
    unit in the last place (at lr 5e-5, every weight above ~0.016) is lost, step after step,
    and the weight never moves. Here each update is computed in fp32 and added together with
    `compensation`, the rounding error the previous steps left (stored in the parameter's own
    dtype, 2 bytes per weight); what the bf16 weight cannot hold is carried forward, so over
    steps the weight follows the fp32 trajectory to within one rounding. The moments are fp32.
    fp32 parameters get plain AdamW (no compensation). Same hyperparameters and update rule as
    `torch.optim.AdamW` (decoupled weight decay, bias correction)."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader casts every floating state tensor to its parameter's dtype, which would
        round the fp32 moments of a bf16 parameter to bf16 on resume: put them back exactly."""
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params, strict=True):
            saved = state_dict["state"].get(i, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:
                    self.state[p][key] = saved[key].to(device=p.device, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, lr, b1, b2, eps, wd)
        return loss

    def _update(
        self, p: torch.Tensor, lr: float, b1: float, b2: float, eps: float, wd: float
    ) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            if p.dtype != torch.float32:
                state["compensation"] = torch.zeros_like(p)
        state["step"] += 1
        step = float(state["step"])
        g = cast(torch.Tensor, p.grad).float()  # step() skips parameters without a gradient
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2**step)).add_(eps)
        w = p.float()
        update = (m / denom).mul_(-lr / (1 - b1**step)).sub_(w, alpha=lr * wd)
        if "compensation" not in state:
            p.add_(update)
            return
        comp = state["compensation"]
        exact = w.add_(update.add_(comp.float()))  # what the weight should now be, in fp32
        p.copy_(exact)  # rounded to the parameter's dtype
        comp.copy_(exact.sub_(p.float()))  # the part the rounding lost, carried to the next step


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
