"""The live reader of MindFormers' loss lines (`sft_mindspore.logs.LiveRows`, fed by
`launch.LogTailer`): whatever the chunking of the workers' output, each step becomes one row, in
order, as soon as every rank logged it, with the same values `metric_rows` gives after the run.

    $ .venvs/ms/bin/python -m pytest tests/backends/mindspore/test_live_metrics.py -q
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("mindspore")

from sft_mindspore.launch import LogTailer
from sft_mindspore.logs import LiveRows, StepTokens, metric_rows, parse_lines

pytestmark = [pytest.mark.mindspore]

STEPS = [StepTokens(10 + i, 20 + i, 0, [4 + i, 6]) for i in range(6)]


def log_line(step: int, loss: float) -> str:
    return (
        "2026-12-03 08:47:54,150 - mindformers[mindformers/core/callback/callback.py:747] - INFO - "
        f"{{ Epoch:[  1/  1], step:[{step:5d}/    6], loss:[{loss:.6f}/{loss:.6f}], "
        f"per_step_time: {20 + step}ms, lr: {1e-3 * step:.6g}, overflow cond: False, "
        f"loss_scale: 1.0, global_norm: [{0.5 + step}], train_throughput_per_npu: 1T\n"
        "some other MindFormers line\n"
    )


def test_any_chunking_of_two_ranks_gives_each_step_once_in_order() -> None:
    logs = ["".join(log_line(s, 2.0 + s + r / 10) for s in range(1, 7)) for r in range(2)]
    rng = random.Random(0)
    got: list[int] = []
    live = LiveRows(STEPS, ranks=2, start=0, emit=lambda step, row, rec: got.append(step))
    pos = [0, 0]
    while pos != [len(logs[0]), len(logs[1])]:
        r = rng.randrange(2)
        n = rng.randint(1, 40)
        live.feed(r, logs[r][pos[r] : pos[r] + n])
        pos[r] = min(pos[r] + n, len(logs[r]))
        assert got == list(range(1, len(got) + 1))  # in order, never twice, while it runs
    assert got == [1, 2, 3, 4, 5, 6]
    # the same rows metric_rows computes from the whole logs after the run
    per_rank = [parse_lines(text) for text in logs]
    merged = [
        {
            **a,
            "loss": (a["loss"] + b["loss"]) / 2,
            "loss_rank0": a["loss"],
            "rank_losses": [a["loss"], b["loss"]],
        }
        for a, b in zip(*per_rank, strict=True)
    ]
    assert live.rows == metric_rows(merged, STEPS)


def test_a_resumed_run_emits_only_steps_after_its_checkpoint() -> None:
    got: list[int] = []
    live = LiveRows(STEPS, ranks=1, start=3, emit=lambda step, row, rec: got.append(step))
    live.feed(0, "".join(log_line(s, 1.0) for s in range(1, 7)))
    assert got == [4, 5, 6]
    assert live.rows[0][1]["tokens"] == STEPS[3].tokens  # counted from the restart


def test_tailer_reads_files_as_they_grow_without_loss_or_repeat(tmp_path: Path) -> None:
    logs = [tmp_path / "worker_0.log", tmp_path / "worker_1.log"]
    got: list[int] = []
    live = LiveRows(STEPS, ranks=2, start=0, emit=lambda step, row, rec: got.append(step))
    lock = threading.Lock()

    def feed(rank: int, text: str) -> None:
        with lock:
            live.feed(rank, text)

    with LogTailer(logs, feed, interval=0.01):
        files = [p.open("w") for p in logs]
        for step in range(1, 7):
            for f in files:
                text = log_line(step, 3.0)
                f.write(text[:25])  # a line written in two pieces
                f.flush()
                time.sleep(0.005)
                f.write(text[25:])
                f.flush()
        for f in files:
            f.close()
    assert got == [1, 2, 3, 4, 5, 6]


def test_eval_lines_follow_their_steps_training_rows() -> None:
    """`[sft] eval` lines (sft_mindspore.heldout) become eval rows once, after the training rows
    of their step and every step before, from rank 0 only; any chunking of two ranks' logs.
    Logging every 2nd step with eval every step, as torch writes it: eval 1, train 2, eval 2..."""
    from sft_mindspore.heldout import format_line, result

    def text(rank: int) -> str:
        out = ""
        for s in range(1, 7):
            if s % 2 == 0:
                out += log_line(s, 2.0 + s + rank / 10)
            out += format_line(result(s, 10.0 * s + rank, 4)) + "\n"
        return out

    logs = [text(0), text(1)]
    for seed in range(5):
        rng = random.Random(seed)
        got: list[tuple[int, str, float]] = []

        def emit(step: int, row: dict, rec: dict) -> None:
            kind = "eval" if "eval_loss" in row else "train"
            got.append((step, kind, row.get("eval_loss")))

        live = LiveRows(STEPS, ranks=2, start=0, emit=emit)
        pos = [0, 0]
        while pos != [len(logs[0]), len(logs[1])]:
            r = rng.randrange(2)
            n = rng.randint(1, 60)
            live.feed(r, logs[r][pos[r] : pos[r] + n])
            pos[r] = min(pos[r] + n, len(logs[r]))
        live.emit_evals()
        want = []
        for s in range(1, 7):
            if s % 2 == 0:
                want.append((s, "train", None))
            want.append((s, "eval", 10.0 * s / 4))  # rank 0's: summed nll 10 s over 4 tokens
        assert got == want
        assert [e["step"] for e in live.evals] == [1, 2, 3, 4, 5, 6]


def test_rows_a_killed_launch_logged_but_never_wrote_are_recovered(tmp_path: Path) -> None:
    """SIGKILL after both ranks saved the checkpoint of step 4 but before `sft run` wrote the
    rows of steps 3 and 4 (the CI failure of a DP2 kill test: metrics.jsonl went 1, 2, 5, ...
    after the resume): `missing_rows` rebuilds them from the workers' logs, equal to the rows
    an uninterrupted reader writes (cumulative token counts continued), no later step and
    nothing written twice; a step one rank never logged is reported, not invented."""
    from sft_mindspore.heldout import format_line, result
    from sft_mindspore.logs import missing_rows

    texts = ["".join(log_line(s, 2.0 + s + r / 10) for s in range(1, 6 - r)) for r in range(2)]
    texts[0] += format_line(result(3, 10.0, 4)) + "\n" + format_line(result(4, 12.0, 4)) + "\n"
    logs = [tmp_path / "worker_0.log", tmp_path / "worker_1.log"]
    for log, text in zip(logs, texts, strict=True):
        log.write_text(text)
    whole: list[tuple[int, dict]] = []
    live = LiveRows(STEPS, ranks=2, start=0, emit=lambda step, row, rec: whole.append((step, row)))
    for r, text in enumerate(texts):
        live.feed(r, text)
    live.emit_evals()
    kept = [{"step": s, **row} for s, row in whole[:2]]  # what metrics.jsonl got: steps 1, 2
    rows, gap = missing_rows(logs, STEPS, kept, upto=4)
    assert [s for s, _ in rows] == [3, 3, 4, 4]
    assert rows == whole[2:6]  # training 3, eval 3, training 4, eval 4: the live reader's rows
    assert rows[2][1]["trained_tokens"] == sum(s.trained for s in STEPS[:4])
    assert gap == []
    # nothing to add when the rows are all there
    assert missing_rows(logs, STEPS, [{"step": s, **row} for s, row in whole[:6]], 4) == ([], [])
    logs[1].write_text("".join(log_line(s, 2.1 + s) for s in range(1, 4)))  # rank 1 lost step 4
    rows, gap = missing_rows(logs, STEPS, kept, upto=4)
    assert [s for s, r in rows if "trained_tokens" in r] == [3] and gap == [4]
