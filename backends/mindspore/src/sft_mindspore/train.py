"""MindSpore backend training: one `sft run --backend mindspore` from plan to exported weights.

plan -> schedule (core batching) -> RUN_DIR/mindformers/data/train.mindrecord
     -> HF weights as .ckpt -> RUN_DIR/mindformers.yaml -> entry.py (python | msrun)
     -> losses from MindFormers' log -> metrics.jsonl
     -> final/model (merged HF), final/adapter (PEFT), final/mindspore/model.ckpt

$ sft run --backend mindspore --config configs/qwen2-tiny/lora.yaml
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from sft.backend import TrainPlan, TrainResult
from sft.data.batching import count_trained, shard_for_rank
from sft.errors import SftError
from sft.events import RunEvents

from sft_mindspore import data as msdata
from sft_mindspore import mfconfig
from sft_mindspore.export import export_final
from sft_mindspore.launch import launch
from sft_mindspore.logs import StepTokens, metric_rows, parse_losses
from sft_mindspore.weights import check_model_type, hf_to_ckpt

YAML_HEADER = (
    "# MindFormers legacy finetune config written by sft from {config}.\n"
    "# Rerun it directly: python -m sft_mindspore.entry --config {path}\n"
    "# (or with MindFormers' run_mindformer.py on Ascend after `import sft_mindspore.lr`, which\n"
    "# registers the lr_schedule class; msrun for several devices).\n"
)


def resolve_device(options: Any) -> str:
    """`mindspore.device_target`, with `auto` = Ascend when CANN is installed, else CPU."""
    from sft_mindspore.plugin import _device

    return _device(options)


def prepare(plan: TrainPlan, device: str) -> tuple[Path, msdata.Schedule, Path]:
    """Data, weights and YAML in RUN_DIR; returns (yaml path, schedule, MindFormers output dir)."""
    cfg = plan.config
    check_model_type(plan.model.path)
    work = plan.run_dir / "mindformers"
    schedule = msdata.build_schedule(plan.data.train, cfg, cfg.parallel.world_size)
    dataset = msdata.write_training_data(plan.data.train, schedule, plan.data.pad_id, work / "data")
    init_ckpt = work / "init" / "model.ckpt"
    resume = resume_dir(plan)
    if resume is None or not init_ckpt.exists():
        # LoRA: the starting adapters are core's seeded draw, the same the torch backend uses
        lora = cfg.method if cfg.method.name == "lora" else None
        hf_to_ckpt(plan.model.path, init_ckpt, lora=lora, seed=cfg.train.seed)
    output_dir = work / "output"
    doc = mfconfig.build_yaml(plan, schedule, str(init_ckpt), str(dataset), device, str(output_dir))
    apply_resume(doc, resume)
    yaml_path = plan.run_dir / "mindformers.yaml"
    header = YAML_HEADER.format(config=plan.run_dir / "config.yaml", path=yaml_path)
    mfconfig.write_yaml(doc, yaml_path, header)
    return yaml_path, schedule, output_dir


def resume_dir(plan: TrainPlan) -> Path | None:
    """MindFormers' checkpoint directory to resume from, or None for a fresh run.

    `checkpoint.resume: auto` resumes from this run's own MindFormers checkpoints
    (RUN_DIR/mindformers/output/checkpoint/rank_R/*.ckpt) when there are any. A path resolved by
    core (an sft checkpoint of the torch backend) cannot be resumed here."""
    if plan.resume_from is not None:
        raise SftError(
            f"checkpoint.resume: {plan.resume_from} is a torch-backend checkpoint; the "
            "MindSpore backend resumes only its own MindFormers checkpoints, with "
            "checkpoint.resume: auto in the same output_dir"
        )
    ckpt_dir = plan.run_dir / "mindformers" / "output" / "checkpoint"
    if plan.config.checkpoint.resume == "auto" and list(ckpt_dir.glob("rank_0/*.ckpt")):
        return ckpt_dir
    return None


def apply_resume(doc: dict[str, Any], ckpt_dir: Path | None) -> None:
    """Resume -> MindFormers' `resume_training` from its checkpoint directory: it restores
    weights, optimizer state and the step counter and skips the batches already trained (the
    MindRecord is rewritten identically from the same cache and seed)."""
    if ckpt_dir is None:
        return
    doc["load_checkpoint"] = str(ckpt_dir)
    doc["resume_training"] = True


def step_tokens(split: Any, rows: list[list[int]]) -> int:
    """Non-padding tokens (prompt and trained) of a step's rows."""
    return int(sum(int(split.lengths[i]) for row in rows for i in row))


def stop_on_nonfinite(records: list[dict[str, Any]]) -> None:
    """`train.nan_policy: stop` (the only policy here): a non-finite loss in MindFormers' log
    fails the run before anything is exported from the diverged weights."""
    bad = [r["step"] for r in records if not math.isfinite(float(r.get("loss", 0.0)))]
    if bad:
        raise SftError(
            f"the loss became non-finite at step {bad[0]} (train.nan_policy: stop); nothing "
            "was exported. Lower train.learning_rate, use precision fp32/bf16, or check the "
            "data of that step"
        )


def train(plan: TrainPlan, events: RunEvents) -> TrainResult:
    cfg = plan.config
    device = resolve_device(plan.options)
    if device == "CPU" and plan.packing:
        raise SftError(
            "data.packing: packed rows need FlashAttention on Ascend; on CPU set "
            "data.packing: false"
        )
    start = time.time()
    yaml_path, schedule, output_dir = prepare(plan, device)
    resuming = resume_dir(plan) is not None
    if not resuming and output_dir.exists():
        shutil.rmtree(output_dir)  # a fresh run must not pick up an older run's checkpoints
    events.train_start(
        {
            "backend": "mindspore",
            "device": device,
            "yaml": str(yaml_path),
            "steps": len(schedule.steps),
            "seq_length": schedule.seq_length,
        }
    )
    log_dir = launch(
        yaml_path,
        cfg.parallel,
        plan.run_dir / "mindformers",
        progress=cfg.logging.progress,
        threads=plan.options.threads  # type: ignore[attr-defined]
        or max(1, (os.cpu_count() or 1) // cfg.parallel.nproc_per_node),
    )
    records = parse_losses(log_dir)
    stop_on_nonfinite(records)
    split = plan.data.train
    epochs = schedule.epochs or [0] * len(schedule.steps)
    world = cfg.parallel.world_size
    steps = [
        StepTokens(
            count_trained(split, rows),
            step_tokens(split, rows),
            epoch,
            [count_trained(split, shard_for_rank(rows, r, world)) for r in range(world)]
            if world > 1
            else None,
        )
        for rows, epoch in zip(schedule.steps, epochs, strict=True)
    ]
    resumed_at = records[0]["step"] - 1 if resuming and records else 0
    rows = metric_rows(records, steps, start=resumed_at)
    for step, row in rows:
        events.log(step, row)
    # rank 0's checkpoint lives on node 0: only that node exports
    outputs = export_final(plan, output_dir) if cfg.parallel.node_rank == 0 else {}
    elapsed = time.time() - start
    last = rows[-1][1] if rows else {}
    train_time = sum(r["step_time_s"] for r in records)
    trained, tokens = int(last.get("trained_tokens", 0)), int(last.get("tokens", 0))
    return TrainResult(
        steps=len(schedule.steps),
        final_loss=last.get("loss"),
        outputs=outputs,
        metrics={  # the shared keys mean what sft.events.SUMMARY_KEYS says
            "device": device,
            "total_steps": len(schedule.steps),
            "rows_per_step": schedule.rows_per_step,
            "world_size": cfg.parallel.world_size,
            "trained_tokens": trained,
            "tokens": tokens,
            "tokens_per_s": round(tokens / max(train_time, 1e-9), 2),
            "trained_tokens_per_s": round(trained / max(train_time, 1e-9), 2),
            "train_time_s": round(train_time, 3),
            "elapsed_s": round(elapsed, 2),
            "resumed_at_step": resumed_at,
            "skipped_steps": [r["step"] for r in records if r.get("skipped")],
            "dropped_rows": schedule.dropped_rows,
            "seq_length": schedule.seq_length,
            "mindformers_yaml": str(yaml_path),
        },
    )
