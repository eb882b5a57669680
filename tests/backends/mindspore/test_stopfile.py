"""The stop-step agreement of several MindFormers workers (`sft_mindspore.stopfile`), with
threads as ranks and a barrier as the gradient all-reduce that keeps data-parallel ranks in
lockstep. Fast; the real msrun runs are in tests/reliability/test_resume_msrun_e2e.py.

    $ .venvs/ms/bin/python -m pytest tests/backends/mindspore/test_stopfile.py -q
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

# the module needs no MindSpore, but only the MindSpore environment installs sft_mindspore
pytest.importorskip("sft_mindspore")

from sft_mindspore.stopfile import StopFiles

pytestmark = pytest.mark.mindspore


def run_ranks(
    stop_dir: Path, ranks: int, steps: int, signal_rank: int | None, signal_after: float
) -> tuple[list[int | None], StopFiles]:
    """Each rank runs `steps` steps (an all-reduce barrier, then random work, then the step-end
    check); `sft run` writes the request after `signal_after` s, or one rank gets the signal
    itself (`signal_rank`). Returns the step each rank stopped at (None: it ran to the end)."""
    launcher = StopFiles(stop_dir)
    launcher.clear()
    allreduce = threading.Barrier(ranks, timeout=60)
    own = [None] * ranks
    stopped: list[int | None] = [None] * ranks

    def rank(r: int, rng: random.Random) -> None:
        files = StopFiles(stop_dir)
        for step in range(1, steps + 1):
            allreduce.wait()  # no rank ends step s before every rank started it
            time.sleep(rng.uniform(0, 0.004))
            if files.should_stop(step, own[r]) is not None:
                stopped[r] = step
                return

    threads = [
        threading.Thread(target=rank, args=(r, random.Random(r)), daemon=True) for r in range(ranks)
    ]
    for t in threads:
        t.start()
    time.sleep(signal_after)
    if signal_rank is None:
        launcher.request("SIGTERM")
    else:
        own[signal_rank] = "SIGINT"
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a rank waits in an all-reduce forever"
    return stopped, launcher


@pytest.mark.parametrize("trial", range(6))
def test_every_rank_stops_at_the_same_step_when_sft_run_requests(
    tmp_path: Path, trial: int
) -> None:
    stopped, files = run_ranks(tmp_path, 4, 400, None, 0.05 + 0.03 * trial)
    agreed = files.agreed()
    assert agreed is not None and agreed[0] == "SIGTERM"
    assert stopped == [agreed[1]] * 4, (stopped, agreed)


def test_a_signal_to_one_worker_stops_all_at_one_step(tmp_path: Path) -> None:
    stopped, files = run_ranks(tmp_path, 3, 400, 2, 0.1)
    agreed = files.agreed()
    assert agreed is not None and agreed[0] == "SIGINT"
    assert stopped == [agreed[1]] * 3, (stopped, agreed)


def test_no_request_no_stop_and_a_new_launch_forgets_the_old_stop(tmp_path: Path) -> None:
    files = StopFiles(tmp_path / "stop")
    files.clear()
    assert [files.should_stop(s, None) for s in range(1, 4)] == [None] * 3
    files.request("SIGTERM")
    assert files.should_stop(4, None) is None and files.agreed() == ("SIGTERM", 5)
    assert files.should_stop(5, None) == "SIGTERM"
    files.clear()
    assert files.agreed() is None and files.should_stop(6, None) is None
