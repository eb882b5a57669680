"""Data parallelism for the torch backend: the process group, ranks, collectives, and how a
global step is split over ranks. Nothing else in `sft_torch` asks torch.distributed for a rank
or calls a collective itself; the engines that wrap the model for a strategy are
`sft_torch.engine` (single process, DDP), `sft_torch.fsdp` and `sft_torch.deepspeed`, chosen by
`sft_torch.strategy.wrap_model`.

    $ sft run --config configs/smollm2-135m/lora.yaml parallel.nproc_per_node=2     # torchrun
    $ torchrun --nproc_per_node 8 -m sft run --config cfg.yaml parallel.nproc_per_node=8

Inside each process (started by torchrun; see `sft_torch.launch` for how `sft run` starts them):

    init_process_group(plan)                    # gloo on CPU, nccl on CUDA, with a timeout
    rank, world = group_info()                  # (0, 1) without a process group
    for mb, weight in rank_micro_batches(schedule, step_rows):     # same count on every rank
        ...                                     # forward / backward through the engine
    loss_sum, tokens = all_reduce_sum([loss_sum, tokens], device)

Every rank computes the same loss normalizer (trained tokens of the whole global batch) from
the plan, without communication; DDP/FSDP average gradients over ranks, so the loop multiplies
by the world size to get the exact global token mean at any world size.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from sft.backend import TrainPlan
from sft.data.batching import Row, micro_batches, shard_for_rank
from sft.data.cache import IGNORE_INDEX
from sft.errors import SftError
from sft.specs import RunConfig

from sft_torch.options import torch_options

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


def group_info() -> tuple[int, int]:
    """(rank, world size) of the process group this process joined; (0, 1) without one (unlike
    `rank()` / `world_size()`, which fall back to torchrun's environment)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_rank() -> int:
    """This process's rank on its node: torchrun's LOCAL_RANK, else the process-group rank
    (0 without a group)."""
    return int(os.environ.get("LOCAL_RANK", group_info()[0]))


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
    if uses_cuda(torch_options(plan).device):
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


def collective_device() -> torch.device | None:
    """Where a tensor for a collective must live, or None in a single process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_max(value: int) -> int:
    """The largest `value` over all ranks (itself in a single process)."""
    device = collective_device()
    if device is None:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank `src`'s `value` on every rank (itself in a single process)."""
    device = collective_device()
    if device is None:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=src)
    return int(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank (itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order ([obj] in a single process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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


# ------------------------------------------------------------------------------- loading


def loads_on_rank0(config: RunConfig) -> bool:
    """Whether this run's model is read from disk by rank 0 alone: FSDP2 with several
    processes. The other ranks build it on the meta device (no memory), and FSDPEngine
    broadcasts rank 0's weights as it shards them, so no rank (and no GPU) holds another's
    shard. Not for qlora (refused with fsdp) or the other strategies."""
    par = config.parallel
    return env_world_size() > 1 and par.strategy == "fsdp" and config.method.name != "qlora"
