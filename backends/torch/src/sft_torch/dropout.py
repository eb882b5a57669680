"""Dropout for the torch backend's CPU runs: `FastDropout` (`torch.fast_dropout`) draws its masks
from 16-bit lanes of 64-bit random draws, and `dropout_generator` gives each thread its own
generator, so micro-batches on concurrent threads (`sft_torch.micro_batch_threads`) draw the
same masks whatever the threads' timing. Fused LoRA (`sft_torch.lora`) draws the same way.

    n = use_fast_dropout(model)          # every nn.Dropout with p > 0 -> FastDropout
    with dropout_generator(seed):        # masks drawn in this thread come from `seed`
        loss = ...
    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_fast_dropout.py
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch


class _DropScale(torch.autograd.Function):
    """x with the `drop` elements zeroed, times scale; saves the bool mask (1 byte an element)
    rather than a float one. torch.where, not a multiply (a bool mask is converted to float
    first, a full copy each way) nor masked_fill (out of place: a copy plus a masked pass, twice
    where's time on CPU)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, drop: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return torch.where(drop, 0.0, x).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (drop,) = ctx.saved_tensors
        return torch.where(drop, 0.0, grad).mul_(ctx.scale), None, None


class FastDropout(torch.nn.Dropout):
    """Inverted dropout whose CPU mask comes from 16-bit lanes of random int64 draws.

    Perf (TorchOptions.fast_dropout): on CPU, torch's dropout draws its Bernoulli mask one
    element at a time (`bernoulli_`); four 16-bit lanes of one 64-bit draw of the same generator
    cost a fraction of that (measured in docs/performance.md). The drop probability is p rounded to a multiple of 2^-16 (0.05 ->
    0.0500031) and kept outputs are scaled by 1 / (1 - that p), so the expectation is exact.
    Seeded by torch's generator like nn.Dropout. Other devices use nn.Dropout's own kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        if drops_all(self.p):
            return x * 0.0
        drop, scale = lane_drop_mask(x.shape, self.p)
        return _DropScale.apply(x, drop, scale)


_THREAD = threading.local()


@contextlib.contextmanager
def dropout_generator(seed: int) -> Iterator[None]:
    """Dropout masks drawn in this thread (FastDropout, sft_torch.lora) come from a generator
    seeded with `seed` instead of torch's default one, so micro-batches run on concurrent
    threads (sft_torch.train) draw the same masks whatever the threads' timing."""
    _THREAD.generator = torch.Generator().manual_seed(seed)
    try:
        yield
    finally:
        _THREAD.generator = None


def thread_generator() -> torch.Generator | None:
    """The generator set by `dropout_generator` in this thread; None: torch's default."""
    return getattr(_THREAD, "generator", None)


def drops_all(p: float) -> bool:
    """Whether FastDropout's p, rounded to a multiple of 2^-16, drops every element."""
    return round(p * 65536) >= 65536


def lane_drop_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """(bool mask of the dropped elements, scale of the kept ones) for dropout p on CPU, from
    16-bit lanes of int64 draws of torch's default generator or this thread's
    (`dropout_generator`) (FastDropout; not `drops_all(p)`)."""
    drop = round(p * 65536)
    n = shape.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64)
    bits.random_(-(2**63), 2**63 - 1, generator=thread_generator())
    lanes = bits.view(torch.int16)[:n].view(shape)
    # int16 lanes are uniform on [-32768, 32767]
    return lanes < drop - 32768, 65536 / (65536 - drop)


def use_fast_dropout(model: Any) -> int:
    """Swap every nn.Dropout with p > 0 inside the model (peft's lora_dropout) for FastDropout;
    returns how many were swapped. State dicts are unchanged (dropout has no state)."""
    swapped = 0
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is torch.nn.Dropout and child.p > 0:
                setattr(mod, name, FastDropout(child.p, child.inplace))
                swapped += 1
    return swapped
