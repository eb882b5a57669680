"""MindFormers' per-step log lines become metrics.jsonl rows with the torch backend's meanings
(issue #22): cumulative token counts, the global-batch loss of data-parallel ranks weighted by
their trained tokens, counts that still cover the steps MindFormers did not print.

    $ .venvs/ms/bin/python -m pytest tests/backends/mindspore/test_parity_metrics.py
"""

from __future__ import annotations

import pytest

pytest.importorskip("mindspore")

from sft_mindspore.logs import StepTokens, metric_rows, parse_lines

LINE = (
    "{{ Epoch:[  1/  1], step:[{step:5d}/    4], loss:[{loss:5.6f}/5.000000], "
    "per_step_time: {ms}ms, lr: {lr}, overflow cond: False, loss_scale: 1.0, "
    "global_norm: [{norm}]\n"
)
STEPS = [StepTokens(trained=10, tokens=30, epoch=0), StepTokens(20, 50, 0)]
STEPS += [StepTokens(30, 70, 1), StepTokens(40, 90, 1)]


def log(steps: list[int]) -> str:
    return "".join(
        LINE.format(step=s, loss=5.0 - s / 10, ms=100 * s, lr=1e-3 * s, norm=s / 2) for s in steps
    )


def test_every_step_logged_gives_cumulative_counts_and_the_steps_own_values():
    rows = metric_rows(parse_lines(log([1, 2, 3, 4])), STEPS)
    assert [s for s, _ in rows] == [1, 2, 3, 4]
    assert [r["trained_tokens"] for _, r in rows] == [10, 30, 60, 100]  # cumulative, as torch
    assert [r["tokens"] for _, r in rows] == [30, 80, 150, 240]
    assert [r["epoch"] for _, r in rows] == [0, 0, 1, 1]
    second = rows[1][1]
    assert second["loss"] == pytest.approx(4.8) and second["lr"] == pytest.approx(2e-3)
    assert second["grad_norm"] == 1.0 and second["tokens_per_s"] == pytest.approx(50 / 0.2)


def test_steps_mindformers_did_not_print_still_count():
    rows = metric_rows(parse_lines(log([2, 4])), STEPS)  # logging.every_steps: 2
    assert [(s, r["trained_tokens"], r["tokens"]) for s, r in rows] == [(2, 30, 80), (4, 100, 240)]


def test_a_resumed_run_counts_from_its_restart():
    rows = metric_rows(parse_lines(log([3, 4])), STEPS, start=2)
    assert [r["trained_tokens"] for _, r in rows] == [30, 70]


def test_data_parallel_loss_is_the_global_batch_token_mean():
    # two ranks: rank 0 trained 30 tokens at loss 2.0, rank 1 10 tokens at loss 4.0
    rec = {"step": 1, "loss": 3.0, "rank_losses": [2.0, 4.0], "lr": 1e-3, "step_time_s": 1.0}
    step = StepTokens(trained=40, tokens=60, epoch=0, trained_ranks=[30, 10])
    ((_, row),) = metric_rows([rec], [step])
    assert row["loss"] == pytest.approx((2.0 * 30 + 4.0 * 10) / 40)  # not the ranks' mean 3.0
