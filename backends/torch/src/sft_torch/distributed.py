"""Data parallelism for the torch backend: the process group, ranks, how a global step is
split over ranks, and the `Engine` the training loop calls instead of touching
torch.distributed itself: single process and DDP here, FSDP2 in `sft_torch.fsdp`, DeepSpeed
ZeRO-2/3 in `sft_torch.deepspeed`.

    $ sft run --config configs/smollm2-135m/lora.yaml parallel.nproc_per_node=2     # torchrun
    $ torchrun --nproc_per_node 8 -m sft run --config cfg.yaml parallel.nproc_per_node=8

Inside each process (started by torchrun; see `sft_torch.launch` for how `sft run` starts them):

    init_process_group(plan)                    # gloo on CPU, nccl on CUDA, with a timeout
    engine = wrap_model(model, plan, device)    # before the optimizer: FSDP2 swaps in DTensors
    engine.attach_optimizer(optimizer)          # DeepSpeed wraps it; a no-op otherwise
    for mb, weight in rank_micro_batches(schedule, step_rows):     # same count on every rank
        with engine.accumulate(last=...):                          # DDP no_sync / FSDP2 sync
            loss, n = engine.forward(batch_loss, batch, settings)  # through DDP / FSDP root
            engine.backward(loss * weight * world / n_global)
    grad_norm = engine.clip_grad_norm(params, max_norm)            # DTensor-aware
    engine.optimizer_step(scaler, optimizer)
    with engine.full_weights():  save on rank 0                    # FSDP2: gathered shards

Why the loss goes through `engine.forward(fn, ...)`: the chunked loss calls the decoder and the
output head separately, but DDP only syncs gradients of forwards that run through the DDP
wrapper, and FSDP2's root unshards the embeddings/head only in the root module's forward. So the
wrapper is a tiny root module whose forward runs `fn(model, *args)`.

Every rank computes the same loss normalizer (trained tokens of the whole global batch) from
the plan, without communication; DDP/FSDP average gradients over ranks, so the loop multiplies
by the world size to get the exact global token mean at any world size.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from sft.backend import TrainPlan
from sft.data.batching import Row, micro_batches, shard_for_rank
from sft.data.cache import IGNORE_INDEX
from sft.errors import SftError
from sft.specs import RunConfig
from torch import nn

#: Seconds a collective may wait before the process group gives up (a dead peer never hangs a
#: job forever; torchrun's agent normally stops the others within seconds of a crash).
TIMEOUT_ENV = "SFT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800


# ------------------------------------------------------------------------------------ ranks


def in_launcher_worker() -> bool:
    """True inside a process started by torchrun (or another launcher that sets its env)."""
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return env_world_size()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------- process group


def uses_cuda(device_option: str) -> bool:
    return device_option == "cuda" or (device_option == "auto" and torch.cuda.is_available())


def timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        return timedelta(seconds=float(raw))
    except ValueError as exc:
        raise SftError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from exc


def init_process_group(plan: TrainPlan) -> bool:
    """Join the job's process group when started by torchrun with WORLD_SIZE > 1 (nccl on
    CUDA, gloo on CPU). Returns whether this call created it (and so must destroy it)."""
    world = env_world_size()
    if world == 1 or dist.is_initialized():
        return False
    check_world(plan, world)
    device_option = getattr(plan.options, "device", "auto")
    if uses_cuda(device_option):
        # before init: nccl binds each process to the device it is using
        torch.cuda.set_device(local_rank() % max(torch.cuda.device_count(), 1))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timeout())
    return True


def check_world(plan: TrainPlan, world: int) -> None:
    """The processes torchrun started must be the ones the config describes: the global batch
    and the data shards depend on the world size."""
    par = plan.config.parallel
    if world != par.world_size:
        raise SftError(
            f"parallel: torchrun started {world} processes but the config says "
            f"nproc_per_node {par.nproc_per_node} x nnodes {par.nnodes} = {par.world_size}; "
            f"pass parallel.nproc_per_node=... parallel.nnodes=... matching the launch"
        )


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over all ranks (identity in a single process)."""
    if world_size() == 1 or not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# -------------------------------------------------------------------------------- batches


def rank_micro_batches(schedule: Any, step_rows: list[Row]) -> list[tuple[list[Row], float]]:
    """This rank's micro-batches of a global step as (rows, weight), padded with weight-0
    copies to the micro-batch count of rank 0 (the largest), so every rank runs the same
    number of forward/backward passes: FSDP2 all-gathers in every forward and DDP reduces in
    the last backward, and a rank with fewer rows (the short last step) must still join them.
    A weight-0 micro-batch adds exactly zero to the gradients and the loss."""
    world, mbs = schedule.world, schedule.micro_batch_size
    mine = micro_batches(shard_for_rank(step_rows, schedule.rank, world), mbs)
    most = len(micro_batches(shard_for_rank(step_rows, 0, world), mbs))
    filler = mine[0] if mine else [step_rows[0]]
    return [(mb, 1.0) for mb in mine] + [(filler, 0.0)] * (most - len(mine))


def eval_micro_batches(
    rows: list[Row], micro_batch_size: int, max_batches: int | None
) -> list[tuple[list[Row], bool]]:
    """This rank's eval micro-batches as (rows, real), padded like `rank_micro_batches`; a
    padding batch (real=False) must be evaluated with every label masked so it counts 0 tokens."""
    r, world = rank(), world_size()
    per_rank = [
        micro_batches(shard_for_rank(rows, k, world), micro_batch_size) for k in range(world)
    ]
    most = max(len(b) for b in per_rank)
    if max_batches:
        most = min(most, max_batches)
    mine = per_rank[r][:most]
    filler = mine[0] if mine else [rows[0]]
    return [(mb, True) for mb in mine] + [(filler, False)] * (most - len(mine))


def eval_batch(batch: dict[str, Any], real: bool) -> dict[str, Any]:
    """The batch itself, or (a padding batch) the same tokens with every label masked."""
    if not real:
        batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    return batch


def reduce_eval(result: dict[str, float], device: torch.device) -> dict[str, float]:
    """Per-rank eval results (token-weighted mean loss) -> the same over all ranks."""
    if world_size() == 1:
        return result
    tokens = float(result.get("eval_tokens", 0.0))
    total, count = all_reduce_sum([result.get("eval_loss", 0.0) * tokens, tokens], device)
    if count == 0:
        return {}
    mean = total / count
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": count}


# -------------------------------------------------------------------------------- engines


class ForwardRoot(nn.Module):
    """The module DDP / FSDP2 wrap: its forward runs `fn(model, *args)`, so a loss that calls
    the model's pieces (decoder, head) still runs inside one wrapped forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)


class Engine:
    """Single process: plain calls. Subclasses add the strategy's communication."""

    strategy = "single"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(model, *args)` for training (gradients flow, and sync where the strategy does)."""
        return fn(self.model, *args, **kwargs)

    def evaluate(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(model, *args)` without gradients (eval, generation)."""
        with torch.no_grad():
            return fn(self.model, *args, **kwargs)

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Context for one micro-batch's forward + backward; gradients sync only when `last`."""
        return contextlib.nullcontext()

    owns_loss_scaling = False  # True: the engine scales fp16 losses, not torch.amp

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once the loop has built its optimizer (DeepSpeed wraps it)."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def optimizer_step(self, scaler: Any, optimizer: torch.optim.Optimizer) -> None:
        scaler.step(optimizer)

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """Inside, `self.model`'s parameters are whole ordinary tensors (for saving)."""
        yield

    # checkpoints: "whole" tensors and an index-keyed optimizer state (one process, DDP)
    checkpoint_format = "whole"

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "world_size": world_size(),
            "format": self.checkpoint_format,
        }

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if keyed_by_name(state):  # written by FSDP2: whole tensors keyed by parameter name
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            set_optimizer_state_dict(self.model, optimizer, state, options=full_options(False))
        else:
            optimizer.load_state_dict(state)

    #: Whether only rank 0 reads a checkpoint's files (the engine sends the other ranks their
    #: part); else every rank reads them.
    loads_on_rank0 = False

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)

    def check_resume(self, saved: dict[str, Any], ckpt: Any) -> None:
        """Every checkpoint format sft writes holds whole tensors and a global data position,
        so any strategy resumes it at any world size; refuse only what is not such a file."""
        fmt = saved.get("format", "whole")
        if fmt == "deepspeed":
            raise SftError(
                f"checkpoint.resume: {ckpt} is a DeepSpeed checkpoint (per-rank partitions); "
                f"resume it with parallel.strategy={saved.get('strategy')} on "
                f"{saved.get('world_size')} processes, not parallel.strategy {self.strategy}"
            )
        if fmt not in ("whole", "fsdp-full"):
            raise SftError(
                f"checkpoint.resume: {ckpt} has checkpoint format {fmt!r} (strategy "
                f"{saved.get('strategy')}), which this version of sft cannot resume"
            )


def keyed_by_name(state: dict[str, Any]) -> bool:
    return any(isinstance(k, str) for k in state.get("state", {}))


def by_name(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> dict[str, Any]:
    """An index-keyed optimizer state (torch's own `state_dict()`) keyed by parameter name
    instead. Index i is the i-th parameter of the optimizer's groups, which sft builds in the
    same order whatever the strategy."""
    names = {id(p): n for n, p in model.named_parameters()}
    ordered = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [{**g, "params": [ordered[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {ordered[i]: v for i, v in state["state"].items()}, "param_groups": groups}


class DDPEngine(Engine):
    strategy = "ddp"

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__(model)
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        # No buffer sync in forward: buffers (rotary tables) are identical everywhere, and eval
        # runs outside the wrapper, where an unmatched broadcast would hang.
        # (torch >= 2.13 renamed broadcast_buffers to forward_sync_buffers)
        new = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        sync = {"forward_sync_buffers" if new else "broadcast_buffers": False}
        self.ddp = DDP(ForwardRoot(model), device_ids=ids, **sync)

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.ddp(fn, *args, **kwargs)

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if last else self.ddp.no_sync()


def full_options(cpu_offload: bool = True, strict: bool = True, broadcast: bool = False) -> Any:
    """Whole (unsharded) state dicts. `broadcast`: loading, only rank 0 holds the whole state
    and torch sends each rank its shards, one tensor at a time."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(
        full_state_dict=True,
        cpu_offload=cpu_offload,
        strict=strict,
        broadcast_from_rank0=broadcast,
    )


def loads_on_rank0(config: RunConfig) -> bool:
    """Whether this run's model is read from disk by rank 0 alone: FSDP2 with several
    processes. The other ranks build it on the meta device (no memory), and FSDPEngine
    broadcasts rank 0's weights as it shards them, so no rank (and no GPU) holds another's
    shard. Not for qlora (refused with fsdp) or the other strategies."""
    par = config.parallel
    return env_world_size() > 1 and par.strategy == "fsdp" and config.method.name != "qlora"


def check_strategy(config: RunConfig, device_type: str) -> None:
    """What `parallel.strategy` cannot do here, said before anything is loaded: the launcher
    calls this before starting processes, and every worker again in `wrap_model`."""
    from sft_torch.strategy import strategy_problems

    problems = strategy_problems(config, device_type)
    if problems:
        raise SftError("; ".join(problems))


def wrap_model(
    model: nn.Module, plan: TrainPlan, device: torch.device, precision: str = "fp32"
) -> Engine:
    """The engine for `parallel.strategy` at this world size. Call it after the method is
    applied (LoRA/freeze) and before the optimizer is built."""
    par = plan.config.parallel
    if world_size() == 1:
        return Engine(model)
    check_strategy(plan.config, device.type)
    if par.strategy == "ddp":
        return DDPEngine(model, device)
    if par.strategy == "fsdp":
        from sft_torch.fsdp import FSDPEngine

        return FSDPEngine(model, device, par.cpu_offload, from_rank0=loads_on_rank0(plan.config))
    from sft_torch import deepspeed  # zero2 / zero3

    return deepspeed.wrap(
        model, plan.config, plan.config.train.accumulation(world_size()), world_size(), precision
    )
