"""`fused_lora`: peft's LoRA Linear (base + adapter, with its dropout) as one autograd Function.

    n = use_fused_lora(peft_model)   # swaps the class of each eligible peft lora.Linear

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate modules and ops, so
each LoRA Linear makes full [tokens x features] passes that are not matmuls: the dropout mask's
float copy and two multiplies, the `* scaling`, the `+`, and in backward the multiplies again and
the sum of the base and adapter input gradients (their share of a CPU LoRA step:
docs/performance.md). Here the same result takes:

    out = x @ W.T (+ bias)                      the frozen base
    h   = (x with dropped elements zeroed) @ A.T * (scaling / keep_rate)     [tokens x r]
    out += h @ B.T                              accumulated into `out` by the GEMM (addmm_)

and backward `gB = g.T @ h`, `gh = g @ B * s`, `gA = gh.T @ xd`, `gx = (gh @ A)[kept] + g @ W`
(the base's input gradient accumulated into the adapter's by the GEMM). The scale is applied to
the rank-r intermediate instead of the wide output, and the mask (bool, as peft's dropout keeps)
is applied once each way. Saved tensors are those of peft's path: the dropped input, h, the mask.

Only the plain case is fused; anything else runs peft's own forward, unchanged: merged or
disabled adapters, several active adapters, `adapter_names` batches, DoRA and other variants, a
LoRA bias, a trainable base, fan_in_fan_out weights, quantized bases (their peft classes are not
swapped), module hooks (accelerate offload), parameters of DeepSpeed ZeRO-3 / FSDP, or mixed
dtypes outside autocast. Under autocast (bf16 on CPU) it runs in the autocast dtype as autocast
would run peft's Linears: x, the weights and the bias cast to it (the frozen base is already
bf16 with `torch.bf16_frozen_weights`; the adapters' casts are differentiable, so their
gradients reach the fp32 parameters as autocast's do), the output in it; x is cast once where
peft's path casts it for the base and again for lora_A. State dicts, saving and merging are
untouched: the swapped class is a subclass of peft's and adds no state. With FastDropout (CPU,
`torch.fast_dropout`) the mask is drawn exactly as that module draws it, so a seed gives peft's
path's mask; with nn.Dropout it is an equivalent Bernoulli(p) mask from `torch.rand`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sft_torch.dropout import FastDropout, drops_all, lane_drop_mask, thread_generator


class _FusedLora(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        drop: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.nn.functional.linear(x2, weight, bias)
        # torch.where: one pass; masked_fill out of place is a copy plus a masked pass, and
        # took twice as long on CPU (0.81 vs 0.42 ms for a 512 x 576 fp32 input, one thread)
        xd = x2 if drop is None else torch.where(drop.view(x2.shape), 0.0, x2)
        h = torch.mm(xd, lora_a.t()).mul_(scale)
        out.addmm_(h, lora_b.t())
        ctx.save_for_backward(weight, lora_a, lora_b, xd, h, drop)
        ctx.scale, ctx.x_shape = scale, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        weight, lora_a, lora_b, xd, h, drop = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gh = torch.mm(g, lora_b).mul_(ctx.scale)
        ga = torch.mm(gh.t(), xd) if ctx.needs_input_grad[3] else None
        gb = torch.mm(g.t(), h) if ctx.needs_input_grad[4] else None
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(gh, lora_a)
            if drop is not None:  # where, not masked_fill_: see forward
                gx = torch.where(drop.view(gx.shape), 0.0, gx)
            gx = gx.addmm_(g, weight).view(ctx.x_shape)
        return gx, None, None, ga, gb, None, None


def _plain_param(p: torch.Tensor | None) -> bool:
    return p is None or (type(p) in (nn.Parameter, torch.Tensor) and not hasattr(p, "ds_id"))


def _base_layer_class() -> type:
    from peft.tuners.lora.layer import Linear

    return Linear


class FusedLoraLinear(_base_layer_class()):  # type: ignore[misc]
    """peft's lora.Linear whose plain case runs as one autograd Function (module docstring)."""

    def _fused_args(self, x: torch.Tensor) -> tuple[Any, ...] | None:
        """(weight, bias, A, B, dropout module, the autocast dtype or None) when this call can
        be fused, else None."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant or self.fan_in_fan_out:
            return None
        base, a, b = self.base_layer, self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        if type(base) is not nn.Linear or b.bias is not None or a.bias is not None:
            return None
        if (
            type(dropout) not in (nn.Identity, nn.Dropout, FastDropout)
            or getattr(dropout, "inplace", False)
            or drops_all(getattr(dropout, "p", 0.0))  # everything dropped: peft's path
        ):
            return None
        if any(m._forward_hooks or m._forward_pre_hooks for m in (base, a, b)) or hasattr(
            base, "_hf_hook"
        ):
            return None
        params = (base.weight, base.bias, a.weight, b.weight)
        if not all(_plain_param(p) for p in params) or base.weight.requires_grad:
            return None
        if base.bias is not None and base.bias.requires_grad:
            return None
        dtypes = {x.dtype} | {p.dtype for p in params if p is not None}
        cast = None
        if torch.is_autocast_enabled(x.device.type):
            cast = torch.get_autocast_dtype(x.device.type)
            if not all(d.is_floating_point for d in dtypes):
                return None
        elif len(dtypes) != 1:
            return None
        return base.weight, base.bias, a.weight, b.weight, dropout, cast

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fused = None if args or kwargs else self._fused_args(x)
        if fused is None:
            return super().forward(x, *args, **kwargs)
        weight, bias, a, b, dropout, cast = fused
        scale = float(self.scaling[self.active_adapters[0]])
        drop = None
        if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
            if type(dropout) is FastDropout and x.device.type == "cpu":
                drop, keep_scale = lane_drop_mask(x.shape, dropout.p)
            else:
                u = torch.rand(x.shape, device=x.device, generator=thread_generator())
                drop = u < dropout.p
                keep_scale = 1.0 / (1.0 - dropout.p)
            scale *= keep_scale
        if cast is None:
            out: torch.Tensor = _FusedLora.apply(x, weight, bias, a, b, drop, scale)
            return out
        low = [None if t is None else t.to(cast) for t in (x, weight, bias, a, b)]
        with torch.autocast(x.device.type, enabled=False):  # the dtypes are set here
            out = _FusedLora.apply(*low, drop, scale)
        return out


def use_fused_lora(model: nn.Module) -> int:
    """Swap each peft lora.Linear (exactly that class, over a plain nn.Linear) for
    FusedLoraLinear; returns how many were swapped. Parameters, buffers and state-dict keys are
    unchanged; calls that cannot be fused run peft's forward."""
    cls = _base_layer_class()
    swapped = 0
    for mod in model.modules():
        if type(mod) is cls and type(mod.base_layer) is nn.Linear:
            mod.__class__ = FusedLoraLinear
            swapped += 1
    return swapped
