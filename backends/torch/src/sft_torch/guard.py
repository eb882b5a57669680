"""The torch loop's guards: stop signals (preemption) and the NaN policy, as small pieces that
`sft_torch.train` calls. The decisions and exit codes live in core (`sft.guard`), shared with
every backend; this module adds what needs torch.

    guard = StepGuard.build(plan)               # NaN policy + test hook
    loss = guard.poison(loss, step)             # NaN at SFT_TEST_INJECT_NAN_STEP (test hook)
    if not guard.allow(step, loss, grad_norm, step_rows, optimizer):
        ...                                     # skipped: grads zeroed, no optimizer/LR step
    with StopSignals() as stop:
        ...
        if signame := agreed_stop(stop):        # every rank, every step (a tiny all-reduce)
            stop_for_signal(signame, state, run_dir, position, fingerprint, keep_last)

See docs/reliability.md for what users see. Tests:

    $ .venvs/torch/bin/python -m pytest tests/reliability/test_guard_torch.py tests/reliability/test_resume_e2e.py
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from sft.backend import TrainPlan
from sft.checkpoints import MARKER, checkpoint_dir
from sft.data.schedule import Position
from sft.guard import Diverged, NanPolicy, Preempted, StopSignals, injected_nan_steps

from sft_torch.checkpoints import TrainState, save_checkpoint
from sft_torch.distributed import all_reduce_max, broadcast_int

__all__ = ["StepGuard", "StopSignals", "agreed_stop", "stop_for_signal"]


@dataclass
class StepGuard:
    """The NaN policy of one run plus the test hook that injects NaN losses."""

    policy: NanPolicy
    poison_steps: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def build(cls, plan: TrainPlan) -> StepGuard:
        tr = plan.config.train
        policy = NanPolicy(tr.nan_policy, tr.max_consecutive_skips, plan.data.train.sources)
        return cls(policy, injected_nan_steps())

    def poison(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss, or NaN at a step named in SFT_TEST_INJECT_NAN_STEP (1-based). Multiplying
        keeps the graph, so backward really produces NaN gradients, as a diverged step would."""
        if step in self.poison_steps:
            return loss * float("nan")
        return loss

    def allow(
        self,
        step: int,
        loss: float,
        grad_norm: float,
        step_rows: list[list[int]],
        optimizer: torch.optim.Optimizer,
    ) -> bool:
        """Whether to apply this step's update (1-based `step`). On a skip the gradients are
        dropped here, so nothing of the bad step leaks into the next one; the caller then steps
        neither the optimizer nor the LR schedule. Raises `sft.guard.Diverged` to stop."""
        ids = [i for row in step_rows for i in row]
        if self.policy.check(step, loss, grad_norm, ids):
            return True
        optimizer.zero_grad(set_to_none=True)
        return False

    def applied(self) -> None:
        """A step's update was applied: the count of consecutive skips restarts."""
        self.policy.consecutive = 0

    def overflowed(self, step: int, scale: float) -> None:
        """Count a step the fp16 grad scaler skipped (inf/NaN gradients at loss scale `scale`;
        the scaler halves it). A few such skips are how loss scaling finds its scale and are
        not an error under either nan_policy; more than `train.max_consecutive_skips` in a row
        mean the gradients are not finite at any scale: raise `Diverged`."""
        p = self.policy
        p.consecutive += 1
        if p.consecutive > p.max_consecutive:
            raise Diverged(
                f"{p.consecutive} fp16 steps in a row overflowed (train.max_consecutive_skips is "
                f"{p.max_consecutive}); the loss scale fell to {scale / 2:g} at step {step}. "
                "Lower train.learning_rate or use precision bf16/fp32"
            )
        p.skipped.append(step)
        print(
            f"sft: skipped step {step}: fp16 gradient overflow at loss scale {scale:g}",
            file=sys.stderr,
            flush=True,
        )


def agreed_stop(stop: StopSignals) -> str | None:
    """The stop signal as all ranks agree on it (SIGTERM wins over SIGINT). torchrun forwards a
    SIGTERM to every worker, but they may notice it one step apart; without agreement one rank
    would stop while the others wait in the next step's all-reduce forever. Every rank must call
    this after every step."""
    code = all_reduce_max(int(signal.Signals[stop.requested]) if stop.requested else 0)
    return signal.Signals(code).name if code else None


def _saved_already(ckpt: Path) -> bool:
    # Rank 0's view, shared with every rank: other nodes may not see rank 0's disk.
    return bool(broadcast_int(int((ckpt / MARKER).is_file()), src=0))


def stop_for_signal(
    signame: str,
    state: TrainState,
    run_dir: Path,
    position: Position,
    fingerprint: dict[str, Any],
    keep_last: int,
) -> NoReturn:
    """After a stop signal (called by every rank): make sure a complete checkpoint exists for
    the step just finished (the regular schedule may have written it already; otherwise every
    rank joins the save, a collective under FSDP2), then raise `Preempted` (exit 143/130)."""
    ckpt = checkpoint_dir(run_dir, position.global_step)
    if not _saved_already(ckpt):
        save_checkpoint(state, run_dir, position, fingerprint, keep_last)
    raise Preempted(signame, position.global_step, ckpt if state.rank == 0 else None)
