"""The torch backend's training run: `train(plan, events) -> TrainResult`.

Called by `sft run` (`sft.run.run` -> `TorchBackend.train`); to run one by hand:

    $ sft run --config configs/smollm2-135m/lora.yaml torch.device=cpu train.max_steps=20

Flow: seed -> load model (sft_torch.model) -> apply method (sft_torch.methods) -> AdamW + LR
schedule (sft_torch.optim) -> resume (sft_torch.checkpoint) -> for each optimizer step: the
shared batching's rows (sft_torch.data), forward + token-summed loss per micro-batch
(sft_torch.loss), one backward per micro-batch scaled by the trained tokens of the WHOLE global
batch, clip, step -> log / eval / checkpoint -> final weights (sft_torch.outputs) + loss.png.
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

from sft_torch import attention, distributed, runtime
from sft_torch.checkpoint import TrainState, fingerprint, load_checkpoint, save_checkpoint
from sft_torch.data import load_batch
from sft_torch.guard import StepGuard, StopSignals, agreed_stop, stop_for_signal
from sft_torch.loss import LossSettings, batch_loss, eval_loss
from sft_torch.methods import apply_method, count_params
from sft_torch.model import (
    FastDropout,
    cast_frozen_linears,
    causal_lm,
    check_weights_precision,
    compile_layers,
    dropout_generator,
    load_model,
    logits_are_plain,
    master_weights,
    use_fast_dropout,
)
from sft_torch.optim import build_optimizer, build_scheduler
from sft_torch.outputs import save_final

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
        cfg, opts = plan.config, plan.options
        self.plan, self.events, self.cfg = plan, events, cfg
        # before the model is loaded, so its weights and every step's tensors follow it
        self.release_memory = getattr(opts, "release_memory", False) and (
            runtime.release_freed_memory()
        )
        # perf: an explicit torch.num_threads wins; otherwise torch's default (which may count
        # hyper-threads) is capped at the physical cores
        torch.set_num_threads(
            getattr(opts, "num_threads", None)
            or min(torch.get_num_threads(), runtime.physical_cores())
        )
        self.rank, self.world = runtime.dist_info()
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
        self.schedule = Schedule.build(plan, self.rank, self.world)
        runtime.seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.model = self._build_model()
        # DDP / FSDP2 wrapping for world > 1 (sft_torch.distributed); before the optimizer,
        # because FSDP2 replaces the parameters with sharded DTensors
        self.engine = distributed.wrap_model(self.model, plan, self.device, self.precision)
        chunked = opts.chunked_loss and logits_are_plain(self.model)
        self.loss_settings = LossSettings(
            chunked=chunked,
            chunk_size=opts.loss_chunk_size,
            fused=getattr(opts, "fused_loss", True),
            packed=self.packed_attention,
        )
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.micro_batch_threads = micro_batch_threads(
            getattr(opts, "micro_batch_threads", None), self
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
        )  # sft_torch.distributed: FSDP2 checkpoints
        self.state.scaler = self.scaler if self.scaler.is_enabled() else None
        self.fingerprint = fingerprint(plan, self.schedule)
        self.guard = StepGuard.build(plan)
        self.meter = Meter()

    def _build_model(self) -> Any:
        cfg = self.cfg
        lm = load_model(self.plan, self.device, self.precision)
        opts = self.plan.options
        self.attn_implementation = lm.config._attn_implementation  # auto: sdpa, else eager
        self.packed_attention = attention.resolve(
            lm,
            getattr(opts, "packed_attention", "auto"),
            getattr(opts, "attn_implementation", "auto"),
            self.plan.packing,
        )
        if cfg.train.gradient_checkpointing and cfg.method.name != "qlora":
            enable_checkpointing(lm)
        model = apply_method(lm, cfg.method, cfg.train.gradient_checkpointing, seed=cfg.train.seed)
        master_weights(model)  # trained fp16 parameters (model.dtype: float16) train in fp32
        model.train()  # from_pretrained returns eval mode; dropout (LoRA) must be on
        # perf levers (TorchOptions.bf16_frozen_weights / compile); single process only, so
        # FSDP/DeepSpeed never see mixed parameter dtypes
        if (
            getattr(opts, "bf16_frozen_weights", False)
            and self.precision == "bf16"
            and cfg.method.name == "lora"
            and self.world == 1
        ):
            cast_frozen_linears(model, torch.bfloat16)
        if getattr(opts, "fast_dropout", False) and self.device.type == "cpu":
            use_fast_dropout(model)
        # sft_torch.lora; DDP only wraps the model, FSDP / DeepSpeed replace its parameters
        self.fused_lora = 0
        if getattr(opts, "fused_lora", False) and (
            self.world == 1 or cfg.parallel.strategy == "ddp"
        ):
            from sft_torch.lora import use_fused_lora  # imports peft

            self.fused_lora = use_fused_lora(model)
        if getattr(opts, "compile", False):
            compile_layers(model)
        return model

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
        scale = self.world / max(n_global, 1)  # DDP averages gradients over ranks
        loss_sum, tokens = 0.0, 0
        # sft_torch.distributed: the same number of micro-batches on every rank (weight 0 pads a
        # short shard); the forward runs through the DDP/FSDP2 wrapper; grads sync on the last
        mbs = distributed.rank_micro_batches(self.schedule, step_rows)
        if self.micro_batch_threads > 1:  # the same sums, micro-batches on concurrent threads
            loss_sum, tokens = self._concurrent_micro_batches(mbs, step, scale)
        else:
            for i, (mb, weight) in enumerate(mbs):
                batch = load_batch(split, mb, pad, self.device)
                with self.engine.accumulate(last=i == len(mbs) - 1):
                    with self.autocast():
                        loss, _ = self.engine.forward(batch_loss, batch, self.loss_settings)
                    loss = self.guard.poison(loss, step) * weight
                    self.engine.backward(self.scaler.scale(loss * scale))  # DeepSpeed: its own
                loss_sum += float(loss.detach())
                tokens += int(batch["attention_mask"].sum()) * int(weight)
        loss_sum, tokens_f = runtime.all_reduce_sum([loss_sum, float(tokens)], self.device)
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

    def _concurrent_micro_batches(
        self, mbs: list[tuple[list[Any], float]], step: int, scale: float
    ) -> tuple[float, int]:
        """The step's micro-batches on `micro_batch_threads` threads at once, each with one
        intra-op thread (`TorchOptions.micro_batch_threads`). Each returns its own gradients
        (autograd.grad) and they are summed into .grad in micro-batch order, and each draws its
        dropout masks from a generator seeded from torch's default one in that order, so the
        result does not depend on the threads' timing. Only used where nothing else draws
        random numbers or holds per-thread state (`micro_batch_threads`)."""
        from concurrent.futures import ThreadPoolExecutor

        split, pad = self.plan.data.train, self.plan.data.pad_id
        seeds = torch.randint(0, 2**62, (len(mbs),)).tolist()

        def run(i: int) -> tuple[float, int, tuple[torch.Tensor | None, ...]]:
            mb, weight = mbs[i]
            batch = load_batch(split, mb, pad, self.device)
            with dropout_generator(seeds[i]), self.autocast():
                loss, _ = batch_loss(self.model, batch, self.loss_settings)
                loss = self.guard.poison(loss, step) * weight
                grads = torch.autograd.grad(
                    self.scaler.scale(loss * scale), self.trainable, allow_unused=True
                )
            return float(loss.detach()), int(batch["attention_mask"].sum()) * int(weight), grads

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the workers' ops: one thread each
        loss_sum, tokens = 0.0, 0
        try:
            with ThreadPoolExecutor(self.micro_batch_threads) as pool:
                for loss, n, grads in pool.map(run, range(len(mbs))):  # in order
                    loss_sum, tokens = loss_sum + loss, tokens + n
                    for p, g in zip(self.trainable, grads, strict=True):
                        if g is not None:
                            p.grad = g if p.grad is None else p.grad.add_(g)
        finally:
            torch.set_num_threads(threads)
        return loss_sum, tokens

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
            "chunked_loss": self.loss_settings.chunked,
            "attn_implementation": self.attn_implementation,
            "packed_attention": self.packed_attention,
            "release_memory": self.release_memory,
            "fused_lora": self.fused_lora > 0,  # peft LoRA Linears swapped (sft_torch.lora)
            "micro_batch_threads": self.micro_batch_threads,
            "packing": self.plan.packing,
            "world_size": self.world,  # sft_torch.distributed: processes and their strategy
            "strategy": self.engine.strategy,
            # read back from the model and torch, not from the config: what really runs
            "gradient_checkpointing": checkpointing_enabled(self.model),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
        }


def checkpointing_enabled(model: Any) -> bool:
    """Whether the transformers model recomputes activations in backward."""
    lm = causal_lm(model)
    flag = getattr(type(lm), "is_activation_checkpointing", None)  # transformers >= 5
    if flag is None:
        flag = getattr(type(lm), "is_gradient_checkpointing", None)
    return bool(flag.fget(lm)) if isinstance(flag, property) else False


def micro_batch_threads(option: int | None, trainer: Trainer) -> int:
    """How many micro-batches of a step run at once (`TorchOptions.micro_batch_threads`).

    More than one only on CPU, in one process, without gradient checkpointing (its recompute
    replays torch's default generator, not a thread's), and when every dropout of the model is
    a FastDropout (drawing from `dropout_generator`, as fused LoRA does) and attention has none:
    anything else drawing random numbers on concurrent threads would make runs irreproducible;
    and no peft LoRA on MoE expert parameters (its per-forward parametrization is module state).
    `None` (auto): torch's thread count when that is 2-4 and the step has that many
    micro-batches (measured on 2 cores: 1.12x); else 1."""
    auto = option is None
    if option is None:
        want = torch.get_num_threads()
        option = want if 2 <= want <= 4 and trainer.schedule.accumulation >= want else 1
    if option <= 1:
        return 1
    lm = causal_lm(trainer.model)
    unmanaged = [  # FastDropout (and fused LoRA, which draws as it does) use dropout_generator
        n
        for n, m in trainer.model.named_modules()
        if isinstance(m, torch.nn.Dropout) and m.p > 0 and not isinstance(m, FastDropout)
    ]
    attn_dropout = getattr(lm.config, "attention_dropout", 0.0)
    # peft's LoRA on parameters (MoE experts) registers a parametrization on the shared module
    # for each forward: two threads at once break each other's graphs (qwen3_moe, mixtral)
    param_lora = [n for n, m in trainer.model.named_modules() if type(m).__name__ == "ParamWrapper"]
    blockers = [
        f"device {trainer.device.type}" if trainer.device.type != "cpu" else "",
        f"{trainer.world} processes" if trainer.world > 1 else "",
        "gradient checkpointing" if trainer.cfg.train.gradient_checkpointing else "",
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


def enable_checkpointing(lm: Any) -> None:
    """Recompute decoder-layer activations in backward. Non-reentrant: works with frozen inputs
    (LoRA) without enable_input_require_grads. (transformers 5 renamed the method.)"""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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
