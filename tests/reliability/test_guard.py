"""The shared run guards (core, no torch): stop signals become a flag, the NaN policy stops or
skips with the step and samples named, and the exit codes are the documented ones.

    $ .venvs/core/bin/python -m pytest tests/reliability/test_guard.py -q
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
from sft.errors import SftError
from sft.guard import (
    EXIT_DIVERGED,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    Diverged,
    NanPolicy,
    Preempted,
    StopSignals,
    injected_nan_steps,
)

SOURCES = [f"train.jsonl:{i + 1}" for i in range(20)]


def test_exit_codes_follow_the_shell_convention_and_differ_from_errors() -> None:
    assert (EXIT_SIGTERM, EXIT_SIGINT) == (143, 130)
    assert Preempted("SIGTERM", 7, Path("/r/checkpoints/step-000007")).exit_code == 143
    assert Preempted("SIGINT", 7, None).exit_code == 130
    assert Diverged("x").exit_code == EXIT_DIVERGED == 3
    assert len({143, 130, EXIT_DIVERGED, SftError.exit_code, 2}) == 5
    msg = str(Preempted("SIGTERM", 7, Path("/r/checkpoints/step-000007")))
    assert "step 7" in msg and "step-000007 is complete" in msg and "--resume auto" in msg
    assert "rank 0 wrote" in str(Preempted("SIGTERM", 7, None))  # another rank's view
    assert "nothing to resume" in str(Preempted("SIGINT", 0, None))
    assert str(Preempted("SIGTERM", -1, None)).startswith("stopped by SIGTERM; rank 0 wrote")
    zero = str(Preempted("SIGTERM", 4, None, unresumable="strategy zero3 cannot"))
    assert "no checkpoint: strategy zero3 cannot; the run has to start again" in zero
    assert "--resume" not in zero


def test_a_signal_finishes_the_step_instead_of_killing() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here; the handler only sets a flag
        assert stop.requested == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM changes nothing
        assert stop.requested == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_ctrl_c_aborts_at_once() -> None:
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C, forwarded again by torchrun
        assert stop.requested == "SIGINT"
        stop._first_at -= 2 * stop.REPEAT_S  # the user presses Ctrl-C again, later
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_stop_policy_names_the_step_and_the_samples() -> None:
    nan = NanPolicy("stop", 3, SOURCES)
    assert nan.check(1, 2.5, 0.7, [0, 1])
    with pytest.raises(Diverged) as info:
        nan.check(4, math.nan, math.nan, [11, 3, -1])
    text = str(info.value)
    assert "at step 4" in text
    assert "#11 (train.jsonl:12)" in text and "#3 (train.jsonl:4)" in text
    assert "#-1" not in text  # padding slots of sample_index are not samples
    with pytest.raises(Diverged, match="at step 5"):
        nan.check(5, 1.0, math.inf, [0])  # a finite loss with an infinite gradient norm


def test_skip_policy_skips_up_to_the_limit_then_stops() -> None:
    nan = NanPolicy("skip", 2, SOURCES)
    assert nan.check(1, 1.0, 1.0, [0]) is True
    assert nan.check(2, math.nan, math.nan, [1]) is False
    assert nan.check(3, 1.0, 1.0, [2]) is True  # a good step resets the count
    assert nan.check(4, math.inf, math.nan, [3]) is False
    assert nan.check(5, math.nan, math.nan, [4]) is False
    with pytest.raises(Diverged, match=r"at step 6: 3 non-finite steps in a row .*is 2\)"):
        nan.check(6, math.nan, math.nan, [5])
    assert nan.skipped == [2, 4, 5]


def test_nan_injection_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SFT_TEST_INJECT_NAN_STEP", raising=False)
    assert injected_nan_steps() == frozenset()
    monkeypatch.setenv("SFT_TEST_INJECT_NAN_STEP", "3, 5")
    assert injected_nan_steps() == {3, 5}
    monkeypatch.setenv("SFT_TEST_INJECT_NAN_STEP", "three")
    with pytest.raises(SftError, match="SFT_TEST_INJECT_NAN_STEP"):
        injected_nan_steps()
