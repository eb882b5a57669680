"""MindSpore backend training: one `sft run --backend mindspore` from plan to exported weights.

plan -> schedule (core batching) -> RUN_DIR/mindformers/data/train.mindrecord
     -> HF weights as .ckpt -> RUN_DIR/mindformers.yaml -> worker.py (python | msrun)
     -> losses from MindFormers' log -> metrics.jsonl
     -> final/model (merged HF), final/adapter (PEFT), final/mindspore/model.ckpt

$ sft run --backend mindspore --config configs/smollm2-135m/lora.yaml \\
      data.eval=null eval.every_steps=null eval.prompts=null
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from sft.backend import TrainPlan, TrainResult
from sft.data.batching import count_trained, shard_for_rank
from sft.errors import SftError
from sft.events import RunEvents
from sft.guard import Preempted
from sft.rundir import config_path

from sft_mindspore import data as msdata
from sft_mindspore import heldout, mfconfig, runtime
from sft_mindspore.export import export_final
from sft_mindspore.launch import Stopped, launch, launch_plan, rank_table_path, worker_logs
from sft_mindspore.logs import LiveRows, StepTokens, missing_rows, parse_losses
from sft_mindspore.weights import check_model_type, hf_to_ckpt

YAML_HEADER = (
    "# MindFormers legacy finetune config written by sft from {config}.\n"
    "# Rerun it directly: python -m sft_mindspore.worker --config {path}\n"
    "# (or with MindFormers' run_mindformer.py on Ascend after `import sft_mindspore.lr` and, with\n"
    "# eval data, `import sft_mindspore.heldout_callback`, which register sft's lr_schedule and\n"
    "# SftEvalMonitor classes; msrun for several devices).\n"
)


def device_settings(plan: TrainPlan, device: str) -> runtime.Settings:
    """Precision, memory, JIT ... of this run, with the device MindSpore reports on an Ascend
    host (its kind and memory size); a setting the device cannot do is a ConfigError."""
    detected = runtime.detect_device() if device == "Ascend" else (None, None)
    settings = runtime.resolve(plan.config, plan.options, device, detected)
    for note in settings.notes:
        print(f"[sft] {note}", flush=True)
    return settings


def prepare(
    plan: TrainPlan, device: str, dry_run: bool = False
) -> tuple[Path, msdata.RecordSchedule, Path]:
    """Data, weights and YAML in RUN_DIR; returns (yaml path, schedule, MindFormers output dir).

    Only node 0 writes these shared inputs (several nodes usually share one run directory);
    it then writes `mindformers/prepared.json` with the YAML's hash, which the other nodes wait
    for (`mindspore.node_wait_timeout`). `dry_run` writes the YAML alone (no data, no weights)."""
    cfg = plan.config
    check_model_type(plan.model.path)
    work = plan.run_dir / "mindformers"
    schedule = msdata.build_schedule(plan.data.train, cfg, cfg.parallel.world_size)
    schedule.seq_length = heldout.seq_length(schedule.seq_length, plan)
    init_ckpt = work / "init" / "model.ckpt"
    dataset = work / "data" / "train.mindrecord"
    output_dir = work / "output"
    resume = resume_dir(plan)
    settings = device_settings(plan, device)
    doc = mfconfig.build_yaml(
        plan, schedule, str(init_ckpt), str(dataset), device, str(output_dir), settings
    )
    apply_resume(doc, resume)
    eval_data = work / "data" / heldout.EVAL_FILE
    eval_callback = heldout.callback_entry(plan, eval_data, len(schedule.steps))
    if eval_callback is not None:
        doc["callbacks"].append(eval_callback)
    yaml_path = plan.run_dir / "mindformers.yaml"
    header = YAML_HEADER.format(config=config_path(plan.run_dir), path=yaml_path)
    text = header + yaml.safe_dump(doc, sort_keys=False)
    digest = hashlib.sha256(text.encode()).hexdigest()
    marker = work / PREPARED
    if dry_run:
        yaml_path.write_text(text)
    elif cfg.parallel.node_rank == 0:
        marker.unlink(missing_ok=True)
        if resume is None and output_dir.exists():
            shutil.rmtree(output_dir)  # a fresh run must not pick up an older run's checkpoints
        msdata.write_training_data(plan.data.train, schedule, plan.data.pad_id, work / "data")
        heldout.write_eval_data(plan, schedule.seq_length, work / "data")
        if resume is None or not init_ckpt.exists():
            # LoRA: the starting adapters are core's seeded draw, the same the torch backend uses
            lora = cfg.method if cfg.method.name == "lora" else None
            hf_to_ckpt(plan.model.path, init_ckpt, lora=lora, seed=cfg.train.seed)
        yaml_path.write_text(text)
        _atomic_write(marker, json.dumps({"yaml_sha256": digest, "nnodes": cfg.parallel.nnodes}))
    else:
        wait_for_node0(marker, digest, plan.options.node_wait_timeout)  # type: ignore[attr-defined]
    return yaml_path, schedule, output_dir


PREPARED = "prepared.json"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def wait_for_node0(marker: Path, digest: str, timeout: float, poll: float = 1.0) -> None:
    """Wait until node 0 has written the shared inputs of the same run (same YAML)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.is_file():
            seen = json.loads(marker.read_text()).get("yaml_sha256")
            if seen == digest:
                return
            raise SftError(
                f"{marker}: node 0 prepared a different MindFormers YAML than this node would "
                "(the nodes' configs or data differ); give every node the same config and data"
            )
        time.sleep(poll)
    raise SftError(
        f"waited {timeout:.0f} s for node 0 to write the shared inputs ({marker}); start node 0 "
        "with the same output_dir on a filesystem all nodes share, or raise "
        "mindspore.node_wait_timeout"
    )


def plan_native(plan: TrainPlan) -> dict[str, Any]:
    """`sft run --dry-run`: RUN_DIR/mindformers.yaml and RUN_DIR/launch.sh (every node's
    commands), nothing trained, no weights converted, no MindRecord written."""
    cfg, opts = plan.config, plan.options
    device = runtime.resolve_device(opts)
    yaml_path, schedule, _ = prepare(plan, device, dry_run=True)
    table = rank_table_path(cfg.parallel, device)
    work = plan.run_dir / "mindformers"
    procs = launch_plan(yaml_path, cfg.parallel, work, runtime.hccl_env(opts), table)
    commands: dict[str, list[str]] = {}
    for proc in procs:
        commands.setdefault(f"node {proc.node_rank}", []).append(proc.shell())
    launch_sh = plan.run_dir / "launch.sh"
    lines = [
        "#!/bin/sh",
        f"# Launch commands sft planned for {plan.run_dir / 'config.yaml'} (MindSpore, {device}).",
        "# `sft run` on each node (with parallel.node_rank set) writes the MindRecord and the",
        "# initial checkpoint on node 0, then runs that node's commands below.",
    ]
    for node, cmds in commands.items():
        lines += [f"# --- {node}", *cmds]
    launch_sh.write_text("\n".join(lines) + "\n")
    doc = yaml.safe_load(yaml_path.read_text())
    return {
        "files": {"mindformers_yaml": str(yaml_path), "launch": str(launch_sh)},
        "commands": commands,
        "summary": {
            "device": device,
            "launch": "rank table"
            if table
            else ("msrun" if cfg.parallel.world_size > 1 else "python"),
            "steps": len(schedule.steps),
            "seq_length": schedule.seq_length,
            "global_batch_rows": schedule.rows_per_step,
            "precision": doc["model"]["model_config"]["compute_dtype"],
        },
    }


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


_CKPT_NAME = re.compile(r"-(\d+)_(\d+)\.ckpt$")


def resume_point(ckpt_dir: Path) -> tuple[int, Path]:
    """(optimizer step, rank 0's checkpoint file) MindFormers resumes from in `ckpt_dir`: like its
    resume_ckpt.get_info_from_meta, the smallest `last_step` of the ranks' meta.json (every rank
    must have it), else rank 0's newest checkpoint. sft writes one MindFormers epoch, so the
    step in the name `PREFIX-EPOCH_STEP.ckpt` is the global optimizer step."""
    best: tuple[int, Path] | None = None
    for meta in sorted(ckpt_dir.glob("rank_*/meta.json")):
        try:
            info = json.loads(meta.read_text())
            # sft's callback adds the global step; MindFormers' last_step restarts at 1 after
            # a resume (it counts one launch's steps)
            step = int(info.get("sft_global_step", info["last_step"]))
            name = str(info["last_ckpt_file"])
        except (ValueError, KeyError, TypeError):
            continue
        if best is None or step < best[0]:
            best = (step, ckpt_dir / "rank_0" / re.sub(r"rank_\d+", "rank_0", name))
    if best is not None and best[1].is_file():
        return best
    newest = max(ckpt_dir.glob("rank_0/*.ckpt"), key=lambda p: p.stat().st_mtime)
    m = _CKPT_NAME.search(newest.name)
    return (int(m.group(2)) if m else 0), newest


def saved_checkpoint(output_dir: Path) -> tuple[int, Path | None]:
    """(step, rank 0's file) of the checkpoint a `--resume auto` would continue from now."""
    ckpt_dir = output_dir / "checkpoint"
    if not list(ckpt_dir.glob("rank_0/*.ckpt")):
        return 0, None
    return resume_point(ckpt_dir)


def apply_resume(doc: dict[str, Any], ckpt_dir: Path | None) -> None:
    """Resume -> MindFormers' `resume_training` from its checkpoint directory: it restores
    weights, optimizer state and the step counter and skips the batches already trained (the
    MindRecord is rewritten identically from the same cache and seed).

    `resume_training` names rank 0's file of `resume_point` (each rank loads its own rank_R
    file of that step) instead of `True`: with `True` and several ranks, MindFormers' rank 0
    writes the choice to output/resume_record/ and the other ranks read it after a barrier,
    which is a no-op on CPU (cpu_compat), so rank 1 failed with "Can not find
    .../latest_checkpointed_iteration.txt". sft's choice is the same (the smallest step of the
    ranks' meta.json)."""
    if ckpt_dir is None:
        return
    doc["load_checkpoint"] = str(ckpt_dir)
    doc["resume_training"] = resume_point(ckpt_dir)[1].name


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
    device = runtime.resolve_device(plan.options)
    if device == "CPU" and plan.packing:
        raise SftError(
            "data.packing: packed rows need FlashAttention on Ascend; on CPU set "
            "data.packing: false"
        )
    start = time.time()
    yaml_path, schedule, output_dir = prepare(plan, device)
    ckpt_dir = resume_dir(plan)  # prepare() cleared the outputs of a fresh run
    resumed_at, total = 0, len(schedule.steps)
    ckpt: Path | None
    if ckpt_dir is not None:
        resumed_at, ckpt = resume_point(ckpt_dir)
        print(
            f"[sft] resuming from the MindFormers checkpoint of step {resumed_at} ({ckpt})",
            flush=True,
        )
    events.restart(resumed_at)  # drop rows a killed run logged after that checkpoint
    steps, table = schedule_tokens(plan, schedule), rank_table_path(cfg.parallel, device)
    if resumed_at:
        backfill(plan, events, steps, resumed_at, table)
    events.train_start(
        {
            "backend": "mindspore",
            "resumed_at_step": resumed_at,
            "device": device,
            "yaml": str(yaml_path),
            "steps": len(schedule.steps),
            "seq_length": schedule.seq_length,
        }
    )
    opts: Any = plan.options
    if resumed_at >= total:  # e.g. killed while exporting: MindFormers would refuse to start
        print(f"[sft] all {total} steps were trained; exporting step {total}", flush=True)
        return finished(plan, events, schedule, output_dir, device, yaml_path, start)
    live, bar = live_rows(plan, events, steps, resumed_at)
    try:
        log_dir = launch(
            yaml_path,
            cfg.parallel,
            plan.run_dir / "mindformers",
            threads=opts.threads or max(1, (os.cpu_count() or 1) // cfg.parallel.nproc_per_node),
            env=runtime.hccl_env(opts),
            table=table,
            progress=cfg.logging.progress,
            on_output=live.feed,
        )
    except Stopped as stop:  # SIGTERM / SIGINT: the worker checkpointed the step it finished
        bar.close()
        step, ckpt = saved_checkpoint(output_dir)
        raise Preempted(stop.signame, step, ckpt) from None
    except SftError as exc:  # a worker failed: say what survives
        bar.close()
        step, ckpt = saved_checkpoint(output_dir)
        if ckpt is None:
            raise
        raise SftError(
            f"{exc}\nThe checkpoint of step {step} ({ckpt}) is intact: fix the cause, then "
            "continue with the same command plus --resume auto"
        ) from None
    finally:
        bar.close()
    for rec in parse_losses(log_dir):  # what the live reader could not pair up (none expected)
        if rec["step"] > live.done:
            live.emit_record(rec)
    live.emit_evals()
    records, rows = live.records, live.rows
    stop_on_nonfinite(records)
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
            **last_eval(live.evals),
        },
    )


def backfill(
    plan: TrainPlan, events: RunEvents, steps: list[StepTokens], resumed_at: int, table: str | None
) -> None:
    """Write the rows of steps <= `resumed_at` that the killed launch trained and logged but
    whose metrics.jsonl rows it never wrote (`missing_rows`), from its worker logs, before the
    resumed launch replaces those logs: metrics.jsonl then has every step once."""
    from sft.events import read_metrics

    cfg = plan.config
    if cfg.parallel.node_rank != 0:
        return  # node 0 writes metrics.jsonl
    logs = worker_logs(plan.run_dir / "mindformers", cfg.parallel, table)
    rows, gap = missing_rows(logs, steps, read_metrics(plan.run_dir), resumed_at)
    for step, row in rows:
        events.log(step, row)
    if rows:
        print(
            f"[sft] metrics.jsonl: {len(rows)} row(s) up to step {resumed_at} recovered from "
            "the stopped launch's worker logs",
            flush=True,
        )
    if gap and cfg.logging.every_steps == 1:  # else MindFormers prints some steps only
        print(
            f"[sft] warning: no loss was logged for step(s) {gap} before the stop; "
            "metrics.jsonl has no rows for them",
            flush=True,
        )


def last_eval(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's eval fields (torch's: the last eval row's eval_loss, eval_ppl,
    eval_tokens), none without eval."""
    return {k: v for k, v in evals[-1].items() if k != "step"} if evals else {}


def schedule_tokens(plan: TrainPlan, schedule: msdata.RecordSchedule) -> list[StepTokens]:
    """Core's token counts of every optimizer step (all ranks, and per data-parallel rank), of
    the real rows only: a short step's filler records hold no token. Rank r reads every W-th
    record of a step filled at its end, so its real rows are `shard_for_rank(rows, r, W)`."""
    split, world = plan.data.train, plan.config.parallel.world_size
    epochs = schedule.epochs or [0] * len(schedule.steps)
    return [
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


def live_rows(
    plan: TrainPlan, events: RunEvents, steps: list[StepTokens], resumed_at: int
) -> tuple[LiveRows, Any]:
    """The live reader of MindFormers' loss lines: each step becomes a metrics.jsonl row (and
    TensorBoard's, through the hooks) as soon as every local rank logged it, and moves the
    progress bar (the torch backend's: step/total, ETA, loss, lr, tokens/s)."""
    from tqdm.auto import tqdm

    cfg = plan.config
    bar = tqdm(
        total=len(steps),
        initial=resumed_at,
        disable=not (cfg.logging.progress and cfg.parallel.node_rank == 0),
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )

    def emit(step: int, row: dict[str, Any], rec: dict[str, Any]) -> None:
        events.log(step, row)
        if "loss" in row:
            bar.set_postfix(
                loss=f"{row['loss']:.4f}",
                lr=f"{row['lr']:.2e}",
                tok_s=f"{row['tokens_per_s']:.0f}",
                refresh=False,
            )
        bar.update(step - bar.n)

    return LiveRows(steps, cfg.parallel.nproc_per_node, resumed_at, emit), bar


def finished(
    plan: TrainPlan,
    events: RunEvents,
    schedule: msdata.RecordSchedule,
    output_dir: Path,
    device: str,
    yaml_path: Path,
    start: float,
) -> TrainResult:
    """Every step has a MindFormers checkpoint already (a run killed after training, before its
    summary): export the last one, nothing to train."""
    from sft.events import read_metrics

    outputs = export_final(plan, output_dir) if plan.config.parallel.node_rank == 0 else {}
    rows = read_metrics(plan.run_dir)
    trained = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]  # the final one, recovered by `backfill`
    total = len(schedule.steps)
    return TrainResult(
        steps=total,
        final_loss=trained[-1]["loss"] if trained else None,
        outputs=outputs,
        metrics={
            "device": device,
            "total_steps": total,
            "rows_per_step": schedule.rows_per_step,
            "world_size": plan.config.parallel.world_size,
            "trained_tokens": 0,
            "tokens": 0,
            "tokens_per_s": 0.0,
            "trained_tokens_per_s": 0.0,
            "train_time_s": 0.0,
            "elapsed_s": round(time.time() - start, 2),
            "resumed_at_step": total,
            "skipped_steps": [],
            "dropped_rows": schedule.dropped_rows,
            "seq_length": schedule.seq_length,
            "mindformers_yaml": str(yaml_path),
            **last_eval([{k: v for k, v in r.items() if k != "time"} for r in evals]),
        },
    )
