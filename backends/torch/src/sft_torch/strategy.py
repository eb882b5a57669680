"""What each `parallel.strategy` of the torch backend can do, checked without importing torch,
so `sft config validate` reports it with every other problem and a launch fails before any
process starts; and the engine each strategy trains with (`wrap_model`, which imports torch
when called).

    $ sft config validate --config cfg.yaml parallel.nproc_per_node=2 parallel.strategy=zero2 \
          train.nan_policy=skip
    cfg.yaml: 1 problem
      - train.nan_policy: skip cannot hold back an update inside DeepSpeed's engine ...

    strategy_problems(config, device_type="cpu")   # -> ["parallel.cpu_offload: ...", ...]
    engine = wrap_model(model, plan, device)        # Engine / DDPEngine / FSDPEngine / ZeRO
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from sft.backend import TrainPlan
from sft.errors import SftError
from sft.specs import RunConfig

if TYPE_CHECKING:
    from sft_torch.engine import Engine

DEEPSPEED_INSTALL = 'pip install "sft-torch[deepspeed]"  (or: pip install deepspeed)'


def strategy_problems(config: RunConfig, device_type: str | None) -> list[str]:
    """Problems of `config.parallel` for a multi-process run on `device_type` ("cpu", "cuda";
    None when unknown), as "key.path: message". A single process runs no strategy, so the
    settings of one are refused there rather than ignored."""
    par = config.parallel
    problems = []
    if par.deepspeed_config and par.strategy not in ("zero2", "zero3"):
        problems.append(
            f"parallel.deepspeed_config: is read only by parallel.strategy zero2 / zero3, not "
            f"{par.strategy}; set the strategy or remove deepspeed_config"
        )
    if par.world_size == 1:
        return problems + single_process_problems(config)
    if par.cpu_offload and par.strategy == "ddp":
        problems.append(
            "parallel.cpu_offload: DDP keeps a whole replica on every device and offloads "
            "nothing; use parallel.strategy fsdp, zero2 or zero3 with cpu_offload"
        )
    elif par.cpu_offload and device_type == "cpu":
        # FSDP2's offload needs an accelerator, and DeepSpeed's ZeRO-2 offload path fails on
        # its CPU accelerator: say so plainly instead of a deep traceback
        problems.append(
            "parallel.cpu_offload: offloading moves parameters / optimizer state from GPU "
            "memory to the CPU, but this run trains on the CPU; remove parallel.cpu_offload"
        )
    if par.strategy == "fsdp" and config.method.name == "qlora":
        problems.append(
            "parallel.strategy: fsdp with method qlora is not supported by the torch backend "
            "(4-bit weights cannot be sharded as DTensors); use ddp"
        )
    if par.strategy in ("zero2", "zero3"):
        problems += deepspeed_problems(config)
    return problems


def single_process_problems(config: RunConfig) -> list[str]:
    """Strategy settings that change nothing in one process."""
    par, problems = config.parallel, []
    if par.strategy != "ddp":
        problems.append(
            f"parallel.strategy: {par.strategy} shards over processes, and this run has one "
            "(parallel.nproc_per_node 1, nnodes 1); set nproc_per_node >= 2 or remove strategy"
        )
    if par.cpu_offload:
        problems.append(
            "parallel.cpu_offload: offloading works with parallel.strategy fsdp / zero2 / zero3 "
            "over several processes; this run has one process: remove cpu_offload"
        )
    return problems


def deepspeed_problems(config: RunConfig) -> list[str]:
    """What the ZeRO integration cannot do (yet)."""
    name = config.parallel.strategy
    problems = []
    if importlib.util.find_spec("deepspeed") is None:
        problems.append(
            f"parallel.strategy: {name} needs DeepSpeed, which is not installed; install it "
            f"with: {DEEPSPEED_INSTALL}, or use ddp / fsdp"
        )
    if config.train.nan_policy == "skip":
        problems.append(
            f"train.nan_policy: skip cannot hold back an update inside DeepSpeed's engine; use "
            f"nan_policy: stop with parallel.strategy {name}, or ddp / fsdp"
        )
    if config.method.name == "qlora":
        problems.append("parallel.strategy: ZeRO with method qlora is not supported; use ddp")
    return problems


def check_strategy(config: RunConfig, device_type: str) -> None:
    """What `parallel.strategy` cannot do here, said before anything is loaded: the launcher
    calls this before starting processes, and every worker again in `wrap_model`."""
    problems = strategy_problems(config, device_type)
    if problems:
        raise SftError("; ".join(problems))


def wrap_model(model: Any, plan: TrainPlan, device: Any, precision: str = "fp32") -> Engine:
    """The engine for `parallel.strategy` at this world size. Call it after the method is
    applied (LoRA/freeze) and before the optimizer is built."""
    from sft_torch.distributed import loads_on_rank0, world_size
    from sft_torch.engine import DDPEngine, Engine

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
