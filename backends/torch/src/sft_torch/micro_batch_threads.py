"""`torch.micro_batch_threads`: a step's micro-batches on concurrent CPU threads, each with one
intra-op thread, with the same result as running them one after the other.

    n = resolve(option, model, device, world, gradient_checkpointing, accumulation)  # 1: off
    loss_sum, tokens = run(n, micro_batches, forward, params, autocast)

Each micro-batch returns its own gradients (autograd.grad) and they are summed into .grad in
micro-batch order, and each draws its dropout masks from a generator seeded from torch's default
one in that order (`sft_torch.dropout.dropout_generator`), so the result does not depend on the
threads' timing. `resolve` allows it only where nothing else draws random numbers or holds
per-thread state.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_micro_batch_threads.py
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

import torch
from sft.errors import SftError

from sft_torch.dropout import FastDropout, dropout_generator
from sft_torch.model import causal_lm

#: forward(rows, weight) -> (the micro-batch's weighted loss, what to differentiate, tokens)
Forward = Callable[[Any, float], tuple[torch.Tensor, torch.Tensor, int]]


def resolve(
    option: int | None,
    model: Any,
    device: torch.device,
    world: int,
    gradient_checkpointing: bool,
    accumulation: int,
) -> int:
    """How many micro-batches of a step run at once (`TorchOptions.micro_batch_threads`).

    More than one only on CPU, in one process, without gradient checkpointing (its recompute
    replays torch's default generator, not a thread's), and when every dropout of the model is
    a FastDropout (drawing from `dropout_generator`, as fused LoRA does) and attention has none:
    anything else drawing random numbers on concurrent threads would make runs irreproducible;
    and no peft LoRA on MoE expert parameters (its per-forward parametrization is module state).
    `None` (auto): torch's thread count when that is 2-4 and the step has that many
    micro-batches (`accumulation`); else 1."""
    auto = option is None
    if option is None:
        want = torch.get_num_threads()
        option = want if 2 <= want <= 4 and accumulation >= want else 1
    if option <= 1:
        return 1
    lm = causal_lm(model)
    unmanaged = [  # FastDropout (and fused LoRA, which draws as it does) use dropout_generator
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Dropout) and m.p > 0 and not isinstance(m, FastDropout)
    ]
    attn_dropout = getattr(lm.config, "attention_dropout", 0.0)
    # peft's LoRA on parameters (MoE experts) registers a parametrization on the shared module
    # for each forward: two threads at once break each other's graphs (qwen3_moe, mixtral)
    param_lora = [n for n, m in model.named_modules() if type(m).__name__ == "ParamWrapper"]
    blockers = [
        f"device {device.type}" if device.type != "cpu" else "",
        f"{world} processes" if world > 1 else "",
        "gradient checkpointing" if gradient_checkpointing else "",
        f"torch's own dropout in {', '.join(unmanaged[:3])}" if unmanaged else "",
        f"attention dropout {attn_dropout}" if attn_dropout else "",
        f"LoRA on expert parameters ({param_lora[0]})" if param_lora else "",
    ]
    blockers = [b for b in blockers if b]
    if not blockers:
        return option
    if auto:
        return 1
    raise SftError(
        f"torch.micro_batch_threads: {option} needs CPU, one process, no gradient checkpointing "
        f"and every dropout a FastDropout (torch.fast_dropout: true), no LoRA on MoE expert "
        f"parameters; this run has "
        f"{'; '.join(blockers)}. Set micro_batch_threads: 1 or leave it unset"
    )


def run(
    threads: int,
    micro_batches: Sequence[tuple[Any, float]],
    forward: Forward,
    params: list[torch.nn.Parameter],
    autocast: Callable[[], AbstractContextManager[Any]],
) -> tuple[float, int]:
    """Run `forward` on every (rows, weight) of `micro_batches` on `threads` threads at once and
    accumulate the gradients of `params` in micro-batch order; returns (loss sum, tokens)."""
    seeds = torch.randint(0, 2**62, (len(micro_batches),)).tolist()

    def one(i: int) -> tuple[float, int, tuple[torch.Tensor | None, ...]]:
        rows, weight = micro_batches[i]
        with dropout_generator(seeds[i]), autocast():
            loss, objective, tokens = forward(rows, weight)
            grads = torch.autograd.grad(objective, params, allow_unused=True)
        return float(loss.detach()), tokens, grads

    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' ops: one thread each
    loss_sum, tokens = 0.0, 0
    try:
        for loss, n, grads in workers(threads).map(one, range(len(micro_batches))):  # in order
            loss_sum, tokens = loss_sum + loss, tokens + n
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
    finally:
        torch.set_num_threads(saved)
    return loss_sum, tokens


_WORKERS: dict[int, ThreadPoolExecutor] = {}
_WORKERS_LOCK = threading.Lock()


def workers(threads: int) -> ThreadPoolExecutor:
    """The `threads` worker threads, the same ones for every step of the process.

    Not a new pool per step: glibc gives each thread a malloc arena, and a thread started while
    the previous step's threads are still exiting gets a new one, so arenas (and with
    `sft_torch.runtime.keep_freed_memory` the memory each keeps) piled up step after step; the
    same threads keep their arenas and reuse the memory they freed."""
    with _WORKERS_LOCK:
        if threads not in _WORKERS:
            _WORKERS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="sft-micro-batch")
        return _WORKERS[threads]
