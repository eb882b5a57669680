"""The torch backend's training run: `train(plan, events) -> TrainResult`.

Called by `sft run` (`sft.run.run` -> `TorchBackend.train`); to run one by hand:

    $ sft run --config configs/smollm2-135m/lora.yaml torch.device=cpu train.max_steps=20

Flow: seed -> resolve the speed levers (sft_torch.levers) -> load model (sft_torch.model) ->
apply method (sft_torch.methods) and levers -> wrap for the strategy (sft_torch.strategy) ->
AdamW + LR schedule (sft_torch.optim) -> resume (sft_torch.checkpoints) -> for each optimizer
step: the shared batching's rows (sft_torch.data), forward + token-summed loss per micro-batch
(sft_torch.loss; on threads: sft_torch.micro_batch_threads), one backward per micro-batch scaled
by the trained tokens of the WHOLE global batch, clip, step -> log / eval / checkpoint -> final
weights (sft_torch.outputs) + loss.png.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from sft.backend import TrainPlan, TrainResult
from sft.data.batching import count_trained, epoch_rows
from sft.data.schedule import Position, Schedule, next_position
from sft.errors import SftError
from sft.events import RunEvents

from sft_torch import attention, distributed, micro_batch_threads, runtime
from sft_torch.checkpoints import TrainState, fingerprint, load_checkpoint, save_checkpoint
from sft_torch.data import load_batch
from sft_torch.dropout import use_fast_dropout
from sft_torch.guard import StepGuard, StopSignals, agreed_stop, stop_for_signal
from sft_torch.levers import Levers, resolve_levers
from sft_torch.loss import FROZEN_CAST, LOGITS_BUFFERS, LossSettings, batch_loss, eval_loss
from sft_torch.methods import apply_method, count_params
from sft_torch.model import (
    cast_frozen_linears,
    check_weights_precision,
    checkpointing_enabled,
    compile_layers,
    enable_checkpointing,
    load_model,
    logits_are_plain,
    master_weights,
)
from sft_torch.optim import build_optimizer, build_scheduler
from sft_torch.options import torch_options
from sft_torch.outputs import save_final
from sft_torch.sample_log import SampleLog
from sft_torch.strategy import wrap_model

#: GradScaler's first loss scale in fp16 runs (torch's default); it halves on every overflow
#: and doubles after 2000 clean steps
INIT_LOSS_SCALE = 2.0**16


@dataclass
class StepStats:
    """What one optimizer step did (summed over all ranks)."""

    loss_sum: float
    trained: int
    tokens: int
    grad_norm: float
    lr: float
    seconds: float
    applied: bool = True
    """False when the NaN policy skipped the update."""

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.trained, 1)


@dataclass
class Meter:
    """Accumulates steps between two log lines, and for the whole run."""

    loss_sum: float = 0.0
    trained: int = 0
    tokens: int = 0
    seconds: float = 0.0
    total_trained: int = 0
    total_tokens: int = 0
    total_seconds: float = 0.0
    last_loss: float | None = None
    history: list[float] = field(default_factory=list)

    def add(self, s: StepStats) -> None:
        self.tokens, self.seconds = self.tokens + s.tokens, self.seconds + s.seconds
        self.total_tokens += s.tokens
        self.total_seconds += s.seconds
        if not s.applied:
            return  # a skipped (non-finite) step trains nothing and has no loss to average
        self.loss_sum, self.trained = self.loss_sum + s.loss_sum, self.trained + s.trained
        self.total_trained += s.trained
        self.history.append(s.loss)

    def flush(self) -> dict[str, float]:
        """Token-weighted mean loss and throughput since the last flush."""
        out = {
            "tokens_per_s": self.tokens / max(self.seconds, 1e-9),
            "trained_tokens": float(self.total_trained),
            "tokens": float(self.total_tokens),
        }
        if self.trained:  # no loss when every step since the last line was skipped
            out["loss"] = self.last_loss = self.loss_sum / self.trained
        self.loss_sum, self.trained, self.tokens, self.seconds = 0.0, 0, 0, 0.0
        return out


class Trainer:
    """One run's objects and the operations on them; `train()` below is the linear flow."""

    def __init__(self, plan: TrainPlan, events: RunEvents) -> None:
        cfg, opts = plan.config, torch_options(plan)
        self.plan, self.events, self.cfg = plan, events, cfg
        self.rank, self.world = distributed.group_info()
        self.sample_log = SampleLog(plan.run_dir, self.rank)
        if self.world != cfg.parallel.world_size:
            raise SftError(
                f"parallel: the config asks for {cfg.parallel.world_size} processes but this is "
                f"{self.world}; multi-process runs must be launched with torchrun"
            )
        self.device = runtime.resolve_device(opts.device)
        self.precision = runtime.resolve_precision(
            cfg.train.precision, self.device, cfg.model.dtype
        )
        check_weights_precision(cfg.model.dtype, self.precision)
        levers = resolve_levers(plan, self.device, self.precision, self.world)
        # before the model is loaded, so its weights and every step's tensors follow it
        released = levers.release_memory and runtime.release_freed_memory()
        kept = levers.keep_memory and runtime.keep_freed_memory()
        torch.set_num_threads(levers.threads)
        self.schedule = Schedule.build(plan, self.rank, self.world)
        runtime.seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.model, self.levers = self._build_model(levers)
        # DDP / FSDP2 / ZeRO wrapping for world > 1 (sft_torch.strategy, sft_torch.engine);
        # before the optimizer, because FSDP2 replaces the parameters with sharded DTensors
        self.engine = wrap_model(self.model, plan, self.device, self.precision)
        chunked = levers.chunked_loss and logits_are_plain(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.levers = self.levers.with_model(
            chunked_loss=chunked,
            fused_loss=chunked and levers.fused_loss,
            release_memory=released,
            keep_memory=kept,
            micro_batch_threads=micro_batch_threads.resolve(
                levers.micro_batch_threads,
                self.model,
                self.device,
                self.world,
                cfg.train.gradient_checkpointing,
                self.schedule.accumulation,
            ),
        )
        self.loss_settings = LossSettings(
            chunked=chunked,
            chunk_size=opts.loss_chunk_size,
            fused=opts.fused_loss,
            packed=self.levers.packed_attention,
            reuse_logits=self.levers.keep_memory,
        )
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.engine.attach_optimizer(self.optimizer)  # DeepSpeed ZeRO wraps the optimizer
        self.scheduler = build_scheduler(self.optimizer, cfg.train, self.schedule.total_steps)
        self.scaler = torch.amp.GradScaler(  # DeepSpeed scales fp16 losses itself
            self.device.type,
            init_scale=INIT_LOSS_SCALE,
            enabled=self.precision == "fp16" and not self.engine.owns_loss_scaling,
        )
        self.state = TrainState(
            self.model, self.optimizer, self.scheduler, self.rank, engine=self.engine
        )  # sft_torch.engine: FSDP2 checkpoints
        self.state.scaler = self.scaler if self.scaler.is_enabled() else None
        self.fingerprint = fingerprint(plan, self.schedule)
        self.guard = StepGuard.build(plan)
        self.meter = Meter()

    def _build_model(self, levers: Levers) -> tuple[Any, Levers]:
        """The model with its method and the levers that change it applied, and the levers as
        the loaded model settled them (attention kernel, packed attention, fused LoRA)."""
        cfg = self.cfg
        lm = load_model(self.plan, self.device, self.precision)
        attn_implementation = lm.config._attn_implementation  # auto: sdpa, else eager
        packed = attention.resolve(
            lm, levers.packed_attention, levers.attn_implementation, levers.packing
        )
        if cfg.train.gradient_checkpointing and cfg.method.name != "qlora":
            enable_checkpointing(lm)
        model = apply_method(lm, cfg.method, cfg.train.gradient_checkpointing, seed=cfg.train.seed)
        master_weights(model)  # trained fp16 parameters (model.dtype: float16) train in fp32
        model.train()  # from_pretrained returns eval mode; dropout (LoRA) must be on
        if levers.bf16_frozen_weights:
            cast_frozen_linears(model, torch.bfloat16)
        if levers.fast_dropout:
            use_fast_dropout(model)
        self.fused_lora = 0  # peft LoRA Linears swapped (sft_torch.lora)
        if levers.fused_lora:
            from sft_torch.lora import use_fused_lora  # imports peft

            self.fused_lora = use_fused_lora(model)
        if levers.compile:
            compile_layers(model)
        return model, levers.with_model(
            attn_implementation=attn_implementation,
            packed_attention=packed,
            fused_lora=self.fused_lora > 0,
            # read back from the model, not from the config: what really runs
            gradient_checkpointing=checkpointing_enabled(model),
        )

    @property
    def micro_batch_threads(self) -> int:
        """Micro-batches of a step run at once (`sft_torch.micro_batch_threads`); 1: in turn."""
        return self.levers.micro_batch_threads or 1

    @property
    def packed_attention(self) -> str:
        return self.levers.packed_attention

    def autocast(self) -> AbstractContextManager[Any]:
        return runtime.autocast(self.device, self.precision)

    def resume(self) -> Position:
        if self.plan.resume_from is None:
            return Position()
        return load_checkpoint(
            self.state, self.plan.resume_from, self.fingerprint, self.cfg.checkpoint.allow_changed
        )

    def train_step(self, pos: Position, step_rows: list[list[int]]) -> StepStats:
        """Forward/backward every micro-batch of this rank, then one optimizer step.
        Each micro-batch's summed loss is divided by the trained tokens of the whole global
        batch (all ranks), so the gradient is exactly the global token mean whatever the
        micro-batch size, accumulation or world size. A non-finite step goes to the NaN policy
        (`sft_torch.guard`) before it can touch the weights."""
        t0 = time.perf_counter()
        step = pos.global_step + 1
        split, pad = self.plan.data.train, self.plan.data.pad_id
        n_global = count_trained(split, step_rows)
        norm = self.world / max(n_global, 1)  # DDP averages gradients over ranks
        # sft_torch.distributed: the same number of micro-batches on every rank (weight 0 pads a
        # short shard); the forward runs through the DDP/FSDP2 wrapper; grads sync on the last
        mbs = distributed.rank_micro_batches(self.schedule, step_rows)
        self.sample_log.write(step, mbs)  # SFT_LOG_SAMPLE_IDS=1 only (sft_torch.sample_log)

        def forward(mb: list[Any], weight: float) -> tuple[torch.Tensor, torch.Tensor, int]:
            batch = load_batch(split, mb, pad, self.device)
            loss, _ = self.engine.forward(batch_loss, batch, self.loss_settings)
            loss = self.guard.poison(loss, step) * weight
            tokens = int(batch["attention_mask"].sum()) * int(weight)
            return loss, self.scaler.scale(loss * norm), tokens

        if self.micro_batch_threads > 1:  # the same sums, micro-batches on concurrent threads
            loss_sum, tokens = micro_batch_threads.run(
                self.micro_batch_threads, mbs, forward, self.trainable, self.autocast
            )
        else:
            loss_sum, tokens = 0.0, 0
            for i, (mb, weight) in enumerate(mbs):
                with self.engine.accumulate(last=i == len(mbs) - 1):
                    with self.autocast():
                        loss, objective, n = forward(mb, weight)
                    self.engine.backward(objective)  # DeepSpeed: its own loss scaling
                loss_sum, tokens = loss_sum + float(loss.detach()), tokens + n
        loss_sum, tokens_f = distributed.all_reduce_sum([loss_sum, float(tokens)], self.device)
        grad_norm = self._unscale_and_clip()
        lr = self.optimizer.param_groups[0]["lr"]
        applied = self._allowed(step, loss_sum / max(n_global, 1), grad_norm, step_rows)
        scale = self.scaler.get_scale()  # 1.0 when no loss scaling
        if applied:
            self.engine.optimizer_step(self.scaler, self.optimizer)  # DeepSpeed: in clip
        self.scaler.update()
        if applied and self.scaler.get_scale() < scale:
            # the grad scaler found inf/NaN gradients and skipped optimizer.step (it lowers its
            # scale only then): a skipped step, which must not advance the LR schedule either
            applied = False
            self.guard.overflowed(step, scale)
        elif applied:
            self.guard.applied()
        self.optimizer.zero_grad(set_to_none=True)
        if applied:
            self.scheduler.step()
        return StepStats(
            loss_sum, n_global, int(tokens_f), grad_norm, lr, time.perf_counter() - t0, applied
        )

    def _unscale_and_clip(self) -> float:
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.max_grad_norm or math.inf
        return self.engine.clip_grad_norm(self.trainable, max_norm)  # FSDP2: DTensor grads

    def _allowed(
        self, step: int, loss: float, grad_norm: float, step_rows: list[list[int]]
    ) -> bool:
        if self.precision == "fp16" and math.isfinite(loss):
            return True  # an fp16 overflow: the grad scaler skips the step and lowers its scale
        return self.guard.allow(step, loss, grad_norm, step_rows, self.optimizer)

    def evaluate(self) -> dict[str, float]:
        split = self.plan.data.eval
        if split is None or len(split) == 0:
            return {}
        rows = epoch_rows(
            split.lengths,
            max_seq_len=self.cfg.data.max_seq_len,
            packing=self.plan.packing,
            shuffle=False,
            seed=0,
            epoch=0,
        )
        # sft_torch.distributed: every rank evaluates its shard, padded to equal batch counts
        # (padding batches count no tokens); token-weighted results are summed over ranks
        mbs = distributed.eval_micro_batches(
            rows, self.cfg.train.micro_batch_size, self.cfg.eval.max_batches
        )
        batches = (
            distributed.eval_batch(load_batch(split, mb, self.plan.data.pad_id, self.device), real)
            for mb, real in mbs
        )
        result = self.engine.evaluate(eval_loss, batches, self.loss_settings, self.autocast)
        return distributed.reduce_eval(result, self.device)

    def log_step(self, step: int, stats: StepStats, pos: Position) -> None:
        every = self.cfg.logging.every_steps
        if step % every and step != self.schedule.total_steps:
            return
        metrics = self.meter.flush()
        metrics.update({"lr": stats.lr, "grad_norm": stats.grad_norm, "epoch": float(pos.epoch)})
        if self.guard.policy.skipped:
            metrics["skipped_steps"] = float(len(self.guard.policy.skipped))
        self.events.log(step, metrics)

    def info(self) -> dict[str, Any]:
        total, trainable = count_params(self.model)
        return {
            "params": total,
            "trainable_params": trainable,
            "device": str(self.device),
            "precision": self.precision,
            "optimizer": type(self.optimizer).__name__,  # CompensatedAdamW: pure bf16 weights
            "total_steps": self.schedule.total_steps,
            "rows_per_step": self.schedule.rows_per_step,
            "steps_per_epoch": self.schedule.steps_per_epoch,
            # the speed levers as applied (sft_torch.levers; `sft bench` reports these too)
            **self.levers.report(),
            "world_size": self.world,  # sft_torch.distributed: processes and their strategy
            "strategy": self.engine.strategy,
            "deterministic": torch.are_deterministic_algorithms_enabled(),
        }


def progress_bar(trainer: Trainer, start: Position) -> Any:
    from tqdm.auto import tqdm

    show = trainer.cfg.logging.progress and trainer.rank == 0
    return tqdm(
        total=trainer.schedule.total_steps,
        initial=start.global_step,
        disable=not show,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )


def maybe_eval(trainer: Trainer, step: int, last: bool) -> dict[str, float]:
    every = trainer.cfg.eval.every_steps
    if not (last or (every and step % every == 0)):
        return {}
    result = trainer.evaluate()
    if result:
        trainer.events.log(step, result)
    return result


def maybe_checkpoint(trainer: Trainer, pos: Position, last: bool) -> None:
    ck = trainer.cfg.checkpoint
    step = pos.global_step
    if ck.every_steps and (step % ck.every_steps == 0 or last):
        save_checkpoint(trainer.state, trainer.plan.run_dir, pos, trainer.fingerprint, ck.keep_last)


def train(plan: TrainPlan, events: RunEvents) -> TrainResult:
    """Train as `plan` says, writing metrics, checkpoints and RUN/final; see module docstring."""
    started = time.time()
    return fit(Trainer(plan, events), started)


def fit(trainer: Trainer, started: float | None = None) -> TrainResult:
    """Resume if asked, run every remaining step, write the final outputs. (Split from `train`
    so tests and launchers can hold the Trainer and inspect its model afterwards.)"""
    started = time.time() if started is None else started
    events = trainer.events
    start = trainer.resume()
    if trainer.plan.resume_from is not None and trainer.rank == 0:
        print(
            f"sft: resuming from the checkpoint of step {start.global_step} "
            f"({trainer.plan.resume_from})",
            file=sys.stderr,
            flush=True,
        )
    events.restart(start.global_step)  # drop rows a killed run logged after that checkpoint
    events.train_start({**trainer.info(), "resumed_at_step": start.global_step})
    evals: dict[str, float] = {}
    total = trainer.schedule.total_steps
    with progress_bar(trainer, start) as bar, StopSignals() as stop:
        for pos, step_rows in trainer.schedule.steps(start):
            stats = trainer.train_step(pos, step_rows)
            trainer.meter.add(stats)
            done = next_position(pos, trainer.schedule.steps_per_epoch)
            last = done.global_step == total
            trainer.log_step(done.global_step, stats, pos)
            bar.set_postfix(
                loss=f"{stats.loss:.4f}",
                tok_s=f"{stats.tokens / max(stats.seconds, 1e-9):.0f}",
                refresh=False,
            )
            bar.update(1)
            evals = maybe_eval(trainer, done.global_step, last) or evals
            maybe_checkpoint(trainer, done, last)
            # preempted: checkpoint this step, exit 143/130, resume later. agreed_stop is a
            # collective (all ranks stop after the same step); after the last step just finish.
            if not last and (signame := agreed_stop(stop)):
                ck = trainer.cfg.checkpoint
                stop_for_signal(
                    signame,
                    trainer.state,
                    trainer.plan.run_dir,
                    done,
                    trainer.fingerprint,
                    ck.keep_last,
                )
    if start.global_step >= total:
        evals = trainer.evaluate()
    if trainer.levers.keep_memory:  # what the steps kept goes back before the exports
        LOGITS_BUFFERS.clear()
        FROZEN_CAST.clear()
        runtime.trim_freed_memory()
    return finish(trainer, start, evals, started)


def finish(
    trainer: Trainer, start: Position, evals: dict[str, float], started: float
) -> TrainResult:
    plan, meter = trainer.plan, trainer.meter
    outputs: dict[str, str] = {}
    with trainer.engine.full_weights():  # FSDP2: every rank gathers its shards; rank 0 saves
        if trainer.rank == 0:
            outputs = save_final(trainer.model, plan)
    metrics: dict[str, Any] = {
        **trainer.info(),
        "tokens_per_s": round(meter.total_tokens / max(meter.total_seconds, 1e-9), 2),
        "trained_tokens_per_s": round(meter.total_trained / max(meter.total_seconds, 1e-9), 2),
        "trained_tokens": meter.total_trained,
        "tokens": meter.total_tokens,
        "train_time_s": round(meter.total_seconds, 3),
        "elapsed_s": round(time.time() - started, 3),
        "resumed_at_step": start.global_step,
        "skipped_steps": list(trainer.guard.policy.skipped),
        **evals,
    }
    final = (
        meter.last_loss
        if meter.last_loss is not None
        else (meter.history[-1] if meter.history else None)
    )
    return TrainResult(
        steps=trainer.schedule.total_steps, final_loss=final, outputs=outputs, metrics=metrics
    )
