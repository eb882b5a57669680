"""Run guards shared by every backend: preemption signals, the NaN policy and their exit codes.

Framework-free, so the torch and MindSpore backends (and plugins) stop the same way:

    with StopSignals() as stop:                 # SIGTERM / SIGINT only set a flag ...
        for step in steps:
            loss, grad_norm = forward_backward()
            if nan.check(step, loss, grad_norm, sample_ids):   # False: skip this step
                optimizer_step(); scheduler_step()
            if stop.requested:                  # ... the step finished: checkpoint, then
                save_checkpoint(); raise Preempted(stop.requested, step, ckpt)

Exit codes of `sft run` (see docs/reliability.md): 0 done, 1 error, 2 config error,
3 diverged (`Diverged`), 130 stopped by SIGINT, 143 stopped by SIGTERM (`Preempted`, after a
checkpoint was written: `sft run ... --resume auto` continues from it).

Test hook: `SFT_TEST_INJECT_NAN_STEP=5` (or `5,6,7`) makes backends turn the loss of those
optimizer steps (1-based) into NaN, to exercise the policy end to end. Not for users.

    $ .venvs/core/bin/python -m pytest tests/reliability/test_guard.py    # its tests
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from sft.errors import SftError

EXIT_DIVERGED = 3
EXIT_SIGINT = 128 + signal.SIGINT  # 130, the shell's convention for "killed by signal N"
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143
INJECT_NAN_ENV = "SFT_TEST_INJECT_NAN_STEP"


class Preempted(SftError):
    """A stop signal arrived; the current step finished and a checkpoint was written."""

    def __init__(
        self, signame: str, step: int, checkpoint: Path | None, unresumable: str = ""
    ) -> None:
        """`step` < 0: unknown here (a process that neither writes nor sees the checkpoints).
        `unresumable`: why this run has no resumable checkpoint (e.g. its strategy)."""
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        self.exit_code = 128 + int(signal.Signals[signame])
        resume = "Continue with the same command plus --resume auto"
        if unresumable:
            then = f"no checkpoint: {unresumable}; the run has to start again"
        elif checkpoint is not None:
            then = f"checkpoint {checkpoint} is complete. {resume}"
        elif step == 0:
            then = "no step had finished, so there is nothing to resume; rerun the same command"
        else:
            then = f"rank 0 wrote the checkpoint. {resume}"
        after = f" after step {step}" if step >= 0 else ""
        super().__init__(f"stopped by {signame}{after}; {then}")


class Diverged(SftError):
    """A non-finite loss or gradient norm under `nan_policy: stop` (or too many skips)."""

    exit_code = EXIT_DIVERGED


class StopSignals:
    """Turns SIGTERM and SIGINT into a flag the training loop checks between steps, so a
    preempted job finishes its step and checkpoints instead of dying mid-write. A second SIGINT
    (an impatient Ctrl-C) interrupts at once. Outside the main thread (where Python cannot
    install handlers) it does nothing and `requested` stays None."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    #: A repeated SIGINT sooner than this is the same Ctrl-C arriving twice (the terminal sends
    #: it to every process of the job, and torchrun forwards it to its workers again).
    REPEAT_S = 1.0

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}
        self._first_at = 0.0

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            late = time.monotonic() - self._first_at > self.REPEAT_S
            if signum == signal.SIGINT and self.requested == "SIGINT" and late:
                raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
            return
        self.requested, self._first_at = name, time.monotonic()
        print(
            f"\nsft: {name} received; finishing this step and writing a checkpoint "
            "(Ctrl-C again to abort without one)",
            file=sys.stderr,
            flush=True,
        )


def injected_nan_steps() -> frozenset[int]:
    """Optimizer steps (1-based) whose loss a backend must make NaN (test hook)."""
    raw = os.environ.get(INJECT_NAN_ENV, "").strip()
    if not raw:
        return frozenset()
    try:
        return frozenset(int(s) for s in raw.split(",") if s.strip())
    except ValueError:
        raise SftError(f"{INJECT_NAN_ENV}={raw!r}: expected step numbers like 5 or 5,6") from None


class NanPolicy:
    """`train.nan_policy` for one run. `check()` says whether to apply a step's update:

    - finite loss and gradient norm: True;
    - otherwise, policy `stop`: raise `Diverged` naming the step and its samples;
    - policy `skip`: False (the caller zeroes the gradients and steps neither the optimizer nor
      the LR schedule), until `max_consecutive` skips in a row; one more raises `Diverged`.
    """

    def __init__(self, policy: str, max_consecutive: int, sources: Sequence[str]) -> None:
        self.policy, self.max_consecutive, self.sources = policy, max_consecutive, sources
        self.consecutive = 0
        self.skipped: list[int] = []

    def check(self, step: int, loss: float, grad_norm: float, sample_ids: Sequence[int]) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return True
        what = f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}"
        samples = self.describe(sample_ids)
        if self.policy != "skip":
            raise Diverged(
                f"{what}; samples of that batch: {samples}. Lower train.learning_rate, use "
                "precision fp32/bf16, check these samples, or set train.nan_policy: skip"
            )
        self.consecutive += 1
        if self.consecutive > self.max_consecutive:
            raise Diverged(
                f"{what}: {self.consecutive} non-finite steps in a row "
                f"(train.max_consecutive_skips is {self.max_consecutive}); samples of that "
                f"batch: {samples}. The run has diverged: lower train.learning_rate"
            )
        self.skipped.append(step)
        print(
            f"sft: skipped step {step}: {what.split(' at ')[0]}; samples: {samples}",
            file=sys.stderr,
            flush=True,
        )
        return False

    def describe(self, sample_ids: Sequence[int], limit: int = 8) -> str:
        """`#12 (train.jsonl:13), ...` for the first `limit` samples of a batch."""
        ids = [int(i) for i in sample_ids if int(i) >= 0]
        parts = [
            f"#{i} ({self.sources[i]})" if i < len(self.sources) else f"#{i}" for i in ids[:limit]
        ]
        more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
        return ", ".join(parts) + more
