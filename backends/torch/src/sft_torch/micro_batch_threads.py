"""`torch.micro_batch_threads`: a step's micro-batches on concurrent CPU threads, each with one
intra-op thread, with the same result as running them one after the other.

    n = resolve(option, model, device, world, gradient_checkpointing, accumulation)  # 1: off
    loss_sum, tokens = run(n, micro_batches, forward, params, autocast)

Each micro-batch's gradients go into .grad as its backward produces them, in micro-batch order
(`OrderedGrads`: no thread holds a full set of its own), and each draws its dropout masks from a
generator seeded from torch's default one in that order (`sft_torch.dropout.dropout_generator`), so the result does not depend on the
threads' timing. `resolve` allows it only where nothing else draws random numbers or holds
per-thread state.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_micro_batch_threads.py
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from functools import partial
from typing import Any

import torch
from sft.errors import SftError

from sft_torch.dropout import FastDropout, dropout_generator
from sft_torch.methods import count_params
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
    `None` (auto): torch's thread count when that is 2-4, the step has that many micro-batches
    (`accumulation`) and at most `AUTO_MAX_TRAINED` of the parameters train; else 1."""
    auto = option is None
    if option is None:
        want = torch.get_num_threads()
        option = want if 2 <= want <= 4 and accumulation >= want else 1
        total, trained = count_params(model)
        if option > 1 and trained > AUTO_MAX_TRAINED * total:
            option = 1
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


#: Auto picks one thread when more of the parameters than this train (full and most freeze
#: tuning): each concurrent micro-batch holds its own activations, which for full fine-tuning
#: cost more memory than their speed is worth. SmolLM2-135M, bf16, global batch 4, on the
#: avx512_bf16 EPYC of 2026-12-04 (interleaved `sft bench`, docs/performance.md): 2 threads
#: 229-254 trained tokens/s at 5.3 GB peak RSS, 1 thread 201-227 at 4.4 GB. LoRA (2-3% trained)
#: keeps the threads: its activations are smaller, and there they are 1.12x faster.
AUTO_MAX_TRAINED = 0.10


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
    ordered = OrderedGrads(params)

    def one(i: int) -> tuple[float, int]:
        rows, weight = micro_batches[i]
        try:
            with ordered.micro_batch(i), dropout_generator(seeds[i]), autocast():
                loss, objective, tokens = forward(rows, weight)
                torch.autograd.grad(objective, params, allow_unused=True)  # into .grad: hooks
        finally:
            ordered.finish(i)
        return float(loss.detach()), tokens

    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' ops: one thread each
    loss_sum, tokens = 0.0, 0
    futures = [workers(threads).submit(one, i) for i in range(len(micro_batches))]
    try:
        for future in futures:  # in order
            loss, n = future.result()
            loss_sum, tokens = loss_sum + loss, tokens + n
    finally:
        wait(futures)  # after a failure too: no micro-batch still adds to .grad
        ordered.remove()
        torch.set_num_threads(saved)
    return loss_sum, tokens


class OrderedGrads:
    """Adds each parameter's gradient into its .grad as the backward of a micro-batch produces
    it, in micro-batch order: micro-batch k adds to a parameter only after k - 1 has added to it
    (or finished without a gradient for it), so .grad is g0 + g1 + ... summed in that order,
    whatever the threads' timing, and the same sums as one micro-batch after the other.

    Before, each thread's `autograd.grad` returned all of its gradients at the end and they were
    summed afterwards: every micro-batch in flight held a full-size set (for full fine-tuning of
    SmolLM2-135M, 513 MiB each, three sets at once with 2 threads). Here a hook on each
    parameter takes the gradient the moment it exists and hands autograd back a zero that owns
    no memory (stride 0), so what a thread holds is its activations alone. Waits only ever go to
    an earlier micro-batch, which already runs or has finished, so they cannot deadlock; a
    micro-batch that fails still releases its turn (`finish`), and the error propagates."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.turn = [0] * len(params)  # the micro-batch whose gradient each parameter takes next
        self.cond = threading.Condition()
        self.local = threading.local()
        self.handles = [p.register_hook(partial(self._take, i)) for i, p in enumerate(params)]

    @contextlib.contextmanager
    def micro_batch(self, k: int) -> Iterator[None]:
        self.local.k = k
        try:
            yield
        finally:
            self.local.k = None

    def _take(self, i: int, grad: torch.Tensor) -> torch.Tensor | None:
        k = getattr(self.local, "k", None)
        if k is None:  # a backward outside `run` on this thread: leave it alone
            return None
        with self.cond:
            self.cond.wait_for(lambda: self.turn[i] == k)
        p = self.params[i]
        # a clone first: the gradient autograd passes may alias a tensor its backward still uses
        p.grad = grad.clone() if p.grad is None else p.grad.add_(grad)
        with self.cond:
            self.turn[i] = k + 1
            self.cond.notify_all()
        return torch.zeros((), dtype=grad.dtype, device=grad.device).expand_as(grad)

    def finish(self, k: int) -> None:
        """Micro-batch k is done: pass its turn on for every parameter it left without one."""
        with self.cond:
            for i in range(len(self.params)):
                self.cond.wait_for(lambda i=i: self.turn[i] >= k)  # type: ignore[misc]
                if self.turn[i] == k:
                    self.turn[i] = k + 1
            self.cond.notify_all()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


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
