"""The torch side of the guards: NaN injection really poisons the gradients, a skipped step
drops them, and under torch.distributed every rank agrees on a stop signal that only one rank
saw (2 gloo processes on CPU).

    $ .venvs/torch/bin/python -m pytest tests/reliability/test_guard_torch.py -q
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from sft.guard import Diverged, NanPolicy  # noqa: E402
from sft_torch.guard import StepGuard, StopSignals, agreed_stop  # noqa: E402

pytestmark = pytest.mark.torch


def tiny_step(guard: StepGuard, step: int) -> tuple[torch.nn.Linear, torch.optim.SGD, float]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    loss = guard.poison(lin(torch.ones(1, 4)).pow(2).sum(), step)
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(lin.parameters(), 1.0))
    return lin, opt, loss.item() if math.isfinite(norm) else norm


def test_poisoned_step_has_nan_gradients_and_skip_drops_them() -> None:
    guard = StepGuard(NanPolicy("skip", 2, ["a.jsonl:1"]), frozenset({3}))
    lin, opt, value = tiny_step(guard, 2)
    assert math.isfinite(value) and guard.allow(2, value, 0.5, [[0]], opt)
    lin, opt, norm = tiny_step(guard, 3)
    assert math.isnan(norm) and all(torch.isnan(p.grad).all() for p in lin.parameters())
    before = [p.detach().clone() for p in lin.parameters()]
    assert guard.allow(3, math.nan, norm, [[0]], opt) is False
    assert all(p.grad is None for p in lin.parameters())  # nothing leaks into the next step
    assert all(torch.equal(a, b) for a, b in zip(before, lin.parameters()))


def test_stop_policy_raises_before_the_update() -> None:
    guard = StepGuard(NanPolicy("stop", 3, ["a.jsonl:7"]), frozenset({1}))
    _, opt, norm = tiny_step(guard, 1)
    with pytest.raises(Diverged, match=r"at step 1; samples of that batch: #0 \(a.jsonl:7\)"):
        guard.allow(1, math.nan, norm, [[0, -1]], opt)


def test_single_process_stop_needs_no_collective() -> None:
    with StopSignals() as stop:
        assert agreed_stop(stop) is None
        stop.requested = "SIGINT"
        assert agreed_stop(stop) == "SIGINT"


WORKER = """
import os, sys, torch, torch.distributed as dist
from sft.guard import StopSignals
from sft_torch.guard import agreed_stop, _saved_already
from pathlib import Path
dist.init_process_group("gloo")
rank = dist.get_rank()
stop = StopSignals()
first = agreed_stop(stop)                       # nobody asked to stop
stop.requested = "SIGTERM" if rank == 1 else None
second = agreed_stop(stop)                      # only rank 1 saw the signal
ckpt = Path(sys.argv[1])
if rank == 0:
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "sft-checkpoint.json").write_text("{}")
else:
    ckpt = Path(sys.argv[1] + ".other-node")  # rank 1 cannot see rank 0's disk
saved = _saved_already(ckpt)
print(f"rank{rank} {first} {second} {saved}", flush=True)
dist.destroy_process_group()
"""


def test_ranks_agree_on_a_signal_only_one_of_them_saw(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        ckpt = tmp_path / "checkpoints" / "step-000003"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(ckpt)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "rank0 None SIGTERM True" in outs[0], outs[0]
    assert "rank1 None SIGTERM True" in outs[1], outs[1]
