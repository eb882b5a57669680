"""The step schedule every backend walks: positions, resume points and dropped short steps."""

from __future__ import annotations

import pytest
from sft.data.cache import IGNORE_INDEX, TokenizedSplit
from sft.data.schedule import Position, Schedule, next_position
from sft.errors import SftError
from sft.specs import RunConfig


def _split(n: int) -> TokenizedSplit:
    return TokenizedSplit.from_samples(
        [([3 + i, 4 + i, 5 + i], [IGNORE_INDEX, 4 + i, 5 + i]) for i in range(n)]
    )


def _config(**train) -> RunConfig:
    return RunConfig.model_validate(
        {
            "data": {"train": "x.jsonl", "max_seq_len": 16, "shuffle": False},
            "train": {"micro_batch_size": 2, **train},
        }
    )


def test_steps_walk_epochs_in_order_with_short_last_step() -> None:
    # 5 samples, 2 rows a step: [0,1] [2,3] [4] per epoch; 2 epochs = 6 steps
    s = Schedule.for_split(_split(5), _config(epochs=2), packing=False, rank=0, world=1)
    assert (s.steps_per_epoch, s.total_steps) == (3, 6)
    walked = list(s.steps())
    assert [rows for _, rows in walked] == [[[0], [1]], [[2], [3]], [[4]]] * 2
    assert [p.as_dict() for p, _ in walked[2:4]] == [
        {"epoch": 0, "step_in_epoch": 2, "global_step": 2},
        {"epoch": 1, "step_in_epoch": 0, "global_step": 3},
    ]


def test_resume_from_every_position_continues_the_same_steps() -> None:
    s = Schedule.for_split(_split(5), _config(epochs=2), packing=False, rank=0, world=1)
    walked = list(s.steps())
    for k, (pos, _) in enumerate(walked):
        after = next_position(pos, s.steps_per_epoch)
        assert list(s.steps(after)) == walked[k + 1 :]
        if k + 1 < len(walked):
            assert after == walked[k + 1][0]  # the position a checkpoint stores


def test_drop_last_skips_each_epochs_short_step() -> None:
    s = Schedule.for_split(
        _split(5), _config(epochs=2), packing=False, rank=0, world=1, drop_last=True
    )
    assert (s.steps_per_epoch, s.total_steps) == (2, 4)
    assert [(p.epoch, rows) for p, rows in s.steps()] == [
        (0, [[0], [1]]),
        (0, [[2], [3]]),
        (1, [[0], [1]]),
        (1, [[2], [3]]),
    ]


def test_too_few_samples_for_one_full_step_is_an_error() -> None:
    with pytest.raises(SftError, match="1 samples do not fill one optimizer step of 2 rows"):
        Schedule.for_split(_split(1), _config(), packing=False, rank=0, world=1, drop_last=True)
    with pytest.raises(SftError, match="no training samples left"):
        Schedule.for_split(_split(0), _config(), packing=False, rank=0, world=1)


def test_micro_batches_are_this_ranks_share() -> None:
    s = Schedule.for_split(_split(8), _config(global_batch_size=8), packing=False, rank=1, world=2)
    step_rows = next(s.steps(Position()))[1]
    assert s.micro_batches(step_rows) == [[[1], [3]], [[5], [7]]]
