"""What a torch checkpoint holds: the contents of a checkpoint directory, written and read back.
The directory itself (atomic writes, the completion marker, finding the latest) is core's
`sft.checkpoints`, shared with every backend.

    RUN/checkpoints/step-000120/
        trainable.safetensors   every parameter that trains (LoRA adapters, or the whole model
                                for full fine-tuning); the frozen rest is reloaded from the base
        optimizer.pt            AdamW state          scheduler.pt   LR schedule state
        scaler.pt               fp16 runs: the grad scaler's loss scale and growth tracker
        rng-rank0.pt ...        python, numpy, torch (and CUDA) RNG states, one file per rank
        sft-checkpoint.json     written last: step, data position, fingerprint
        deepspeed/              ZeRO-2/3 only, instead of trainable.safetensors + optimizer.pt:
                                DeepSpeed's own checkpoint, one partition file per rank

    save_checkpoint(state, run_dir, position, fingerprint, keep_last=2)
    position = load_checkpoint(state, ckpt_dir, fingerprint, allow_changed=False)

Resuming rebuilds the model exactly as the first run did, then overwrites the trainable weights,
optimizer, schedule and RNGs, and continues at the saved data position: in fp32 on CPU the
resumed run is bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from sft.backend import TrainPlan
from sft.checkpoints import atomic_checkpoint, checkpoint_dir, read_meta
from sft.data.schedule import Position, Schedule
from sft.errors import SftError

from sft_torch.distributed import all_gather_object, barrier, broadcast_object
from sft_torch.runtime import rng_state, set_rng_state

#: Fingerprint entries that change which rows a step trains on, or what the weights mean.
GUARDED = (
    "data_key",
    "max_seq_len",
    "global_batch",
    "packing",
    "shuffle",
    "seed",
    "group_by_length",
    "method",
)


@dataclass
class TrainState:
    """The mutable objects a checkpoint captures."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    rank: int = 0
    engine: Any = None
    """sft_torch.engine engine (DDP / FSDP2 / ZeRO); None: a single process."""
    scaler: Any = None
    """The fp16 run's torch.amp.GradScaler; None when no loss scaling."""

    def dist(self) -> Any:
        from sft_torch.engine import Engine

        return self.engine or Engine(self.model)


def fingerprint(plan: TrainPlan, schedule: Schedule) -> dict[str, Any]:
    cfg = plan.config
    relevant = cfg.model_dump(mode="json", include={"model", "method", "data", "train"})
    relevant["train"].pop("epochs", None)
    relevant["train"].pop("max_steps", None)  # extending a run is allowed
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "data_key": plan.data.key,
        **schedule.fingerprint(),
        "method": cfg.method.name,
        "config": digest,
    }


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def save_checkpoint(
    state: TrainState, run_dir: Path, position: Position, fp: dict[str, Any], keep_last: int
) -> Path | None:
    """Write a checkpoint for the state after `position.global_step` steps (rank 0 writes;
    with FSDP2 every rank must call it: consolidating the shards is a collective)."""
    engine = state.dist()
    if engine.checkpoint_format == "deepspeed":
        return _save_deepspeed(state, run_dir, position, fp, keep_last)
    optimizer = engine.optimizer_state(state.optimizer)  # sft_torch.engine: whole state
    rngs = rank_rng_states()  # collective: rank 0 saves every rank's RNG (exact DDP resume)
    with engine.full_weights():
        if state.rank != 0:
            return None
        return _write(state, run_dir, position, fp, keep_last, optimizer, rngs)


def _save_deepspeed(
    state: TrainState, run_dir: Path, position: Position, fp: dict[str, Any], keep_last: int
) -> Path | None:
    """DeepSpeed ZeRO (every rank calls it): rank 0 opens the atomic checkpoint directory and
    tells every rank where it is; each rank writes its partitions there with DeepSpeed's own
    `save_checkpoint` (under `deepspeed/`); once all have, rank 0 adds the LR schedule and the
    RNGs and completes the directory. The run directory must be on a filesystem every rank
    sees (as for multi-node runs in general)."""
    engine = state.dist()
    rngs = rank_rng_states()
    if state.rank != 0:
        engine.save_native(_shared_path(None) / "deepspeed")
        barrier()  # rank 0 completes the directory after this
        return None
    meta = {"position": position.as_dict(), "fingerprint": fp, "parallel": engine.describe()}
    with atomic_checkpoint(run_dir, position.global_step, meta, keep_last=keep_last) as tmp:
        _shared_path(tmp)
        engine.save_native(tmp / "deepspeed")
        torch.save(state.scheduler.state_dict(), tmp / "scheduler.pt")
        for rank, rng in enumerate(rngs):
            torch.save(rng, tmp / f"rng-rank{rank}.pt")
        barrier()  # every rank's partitions are written
    return checkpoint_dir(run_dir, position.global_step)


def _shared_path(path: Path | None) -> Path:
    """Rank 0's `path`, on every rank."""
    return Path(broadcast_object(str(path) if path is not None else None, src=0))


def rank_rng_states() -> list[dict[str, Any]]:
    """The RNG state of every rank, in rank order (a collective when world > 1). Each rank's
    dropout draws from its own generators, so resuming only rank 0's would make the other
    ranks replay their first steps' randomness."""
    return all_gather_object(rng_state())


def _write(
    state: TrainState,
    run_dir: Path,
    position: Position,
    fp: dict[str, Any],
    keep_last: int,
    optimizer: dict[str, Any],
    rngs: list[dict[str, Any]],
) -> Path:
    weights = trainable_state(state.model)
    size = sum(t.numel() * t.element_size() for t in weights.values())
    meta = {"position": position.as_dict(), "fingerprint": fp, "parallel": state.dist().describe()}
    with atomic_checkpoint(
        run_dir, position.global_step, meta, keep_last=keep_last, needed_bytes=4 * size
    ) as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(state.scheduler.state_dict(), tmp / "scheduler.pt")
        if state.scaler is not None:
            torch.save(state.scaler.state_dict(), tmp / "scaler.pt")
        for rank, rng in enumerate(rngs):
            torch.save(rng, tmp / f"rng-rank{rank}.pt")
    return checkpoint_dir(run_dir, position.global_step)


def check_fingerprint(
    saved: dict[str, Any], now: dict[str, Any], ckpt: Path, allow_changed: bool
) -> None:
    """Refuse a resume whose data order or method would differ, naming what changed."""
    changed = [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in GUARDED if saved.get(k) != now.get(k)
    ]
    if not changed:
        return
    if "method" in [c.split(":")[0] for c in changed]:
        raise SftError(
            f"cannot resume from {ckpt}: it was trained with method "
            f"{saved.get('method')!r}, this run uses {now.get('method')!r}"
        )
    if not allow_changed:
        raise SftError(
            f"cannot resume from {ckpt}: the run changed since it was saved ({'; '.join(changed)})."
            " Resuming would train on a different data order. Start a new output_dir, or set "
            "checkpoint.allow_changed: true to resume anyway"
        )


def load_checkpoint(
    state: TrainState, ckpt: Path, fp: dict[str, Any], allow_changed: bool
) -> Position:
    """Restore `state` from `ckpt` and return the data position to continue from."""
    meta = read_meta(ckpt)
    check_fingerprint(meta.get("fingerprint", {}), fp, ckpt, allow_changed)
    engine = state.dist()
    engine.check_resume(meta.get("parallel", {}), ckpt)  # strategy / world size changes
    if engine.checkpoint_format == "deepspeed":
        engine.load_native(ckpt / "deepspeed")  # every rank reads its own partitions
    else:
        _load_weights_and_optimizer(state, engine, ckpt)
    state.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    if state.scaler is not None and (ckpt / "scaler.pt").is_file():
        # without it a resumed fp16 run would restart at the initial loss scale and skip steps
        # the uninterrupted run did not
        state.scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=True))
    rng = ckpt / f"rng-rank{state.rank}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=True))
    return Position(**meta["position"])


def _load_weights_and_optimizer(state: TrainState, engine: Any, ckpt: Path) -> None:
    # FSDP2: rank 0 reads the files and the engine sends each rank its shards
    reads = not engine.loads_on_rank0 or state.rank == 0
    weights = load_file(str(ckpt / "trainable.safetensors")) if reads else {}
    params = dict(state.model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if reads and wanted != set(weights):
        missing = sorted(wanted - set(weights))[:3]
        raise SftError(
            f"checkpoint {ckpt} does not match this model's trainable parameters "
            f"(e.g. missing {missing}); was it saved by a different method or model?"
        )
    engine.load_weights(weights)  # FSDP2: each rank keeps its shard of the whole tensors
    device = "cpu" if engine.loads_on_rank0 else next(state.model.parameters()).device
    optimizer = (
        torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True) if reads else {}
    )
    engine.load_optimizer_state(state.optimizer, optimizer)
