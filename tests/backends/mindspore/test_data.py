"""The tokenized cache as MindRecord: MindDataset reads back exactly the cache's ids and labels,
rows come in core batching order, and data-parallel shards are core's `shard_for_rank`.

    $ .venvs/ms/bin/python -m pytest tests/backends/mindspore/test_data.py
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("mindspore")

from sft.data.batching import count_trained, shard_for_rank
from sft.data.cache import IGNORE_INDEX, PreparedData, TokenizedSplit
from sft.data.schedule import Schedule
from sft.plugins import get_plugins
from sft.specs import RunConfig
from sft_mindspore.data import (
    build_schedule,
    read_mindrecord,
    write_mindrecord,
    write_training_data,
)

from tests.backends.mindspore.conftest import synthetic_split

pytestmark = pytest.mark.mindspore


def _config(world: int = 1, **train) -> RunConfig:
    return RunConfig.model_validate(
        {
            "backend": "mindspore",
            "data": {"train": "x.jsonl", "max_seq_len": 64},
            "train": {"micro_batch_size": 2, **train},
            "parallel": {"nproc_per_node": world},
        }
    )


def test_mindrecord_reads_back_the_cache_exactly(tmp_path):
    split = TokenizedSplit.from_samples([([5, 6, 7, 8], [-100, -100, 7, 8]), ([9, 10], [9, 10])])
    path = write_mindrecord(
        split, [[1], [0]], pad_id=0, seq_length=8, path=tmp_path / "t.mindrecord"
    )
    recs = read_mindrecord(path)
    assert [r["input_ids"].tolist() for r in recs] == [[9, 10] + [0] * 7, [5, 6, 7, 8] + [0] * 5]
    # labels are not shifted; the first token of a sample and all padding are -100
    assert [r["labels"].tolist() for r in recs] == [
        [-100, 10] + [-100] * 7,
        [-100, -100, 7, 8] + [-100] * 5,
    ]
    assert recs[0]["input_ids"].dtype == np.int32 and recs[0]["labels"].dtype == np.int32
    assert path.stat().st_size < 1_000_000  # small pages, not MindRecord's 50 MB default


def test_training_records_follow_core_order_and_shard_like_core(tmp_path):
    split = synthetic_split(n=12, seed=4)
    config = _config(max_steps=3)
    schedule = build_schedule(split, config, world=2)
    assert len(schedule.steps) == 3 and schedule.rows_per_step == 4
    path = write_training_data(split, schedule, pad_id=0, out_dir=tmp_path)
    for rank in (0, 1):
        recs = read_mindrecord(path, num_shards=2, shard_id=rank)
        mine = [r for step in schedule.steps for r in shard_for_rank(step, rank, 2)]
        assert len(recs) == len(mine)
        for rec, row in zip(recs, mine):
            ids, labels = split.sample(row[0])
            n = len(ids)
            assert rec["input_ids"][:n].tolist() == ids.tolist()
            assert rec["labels"][1:n].tolist() == labels[1:].tolist()
            assert (rec["labels"][n:] == IGNORE_INDEX).all()
    assert json.loads((tmp_path / "schedule.json").read_text())["steps"] == schedule.steps


def test_data_parallel_ranks_read_disjoint_rows_whose_union_is_each_step(tmp_path):
    """What MindFormers' workers read under msrun: MindDataset(num_shards=2, shard_id=r) on the
    run's MindRecord, rows_per_step / 2 records per step each. Identified by their tokens (not
    through `shard_for_rank`), the two ranks' rows of every step are disjoint and together are
    exactly that step's global batch in schedule.json. (MindFormers shards the dataset inside
    its workers, so per-rank sample ids cannot be logged from a real msrun; this checks the
    plan sft hands it, read back through the same MindDataset sharding.)"""
    split = synthetic_split(n=12, seed=4)
    schedule = build_schedule(split, _config(max_steps=3), world=2)
    path = write_training_data(split, schedule, pad_id=0, out_dir=tmp_path)
    sample_of = {tuple(split.sample(i)[0].tolist()): i for i in range(len(split))}
    assert len(sample_of) == len(split)  # every sample's tokens are unique: ids from tokens
    per_rank = []
    for rank in (0, 1):
        recs = read_mindrecord(path, num_shards=2, shard_id=rank)
        ids = []
        for rec in recs:
            tokens = rec["input_ids"].tolist()
            ids.append(next(i for t, i in sample_of.items() if tokens[: len(t)] == list(t)))
        half = schedule.rows_per_step // 2
        per_rank.append([ids[s * half : (s + 1) * half] for s in range(len(schedule.steps))])
        assert len(ids) == half * len(schedule.steps)
    for s, step in enumerate(schedule.steps):
        r0, r1 = per_rank[0][s], per_rank[1][s]
        assert not set(r0) & set(r1), f"step {s + 1}: both ranks read samples {set(r0) & set(r1)}"
        assert sorted(r0 + r1) == sorted(i for row in step for i in row), (s + 1, r0, r1, step)


# (samples, micro-batch, accumulation, processes, epochs): each leaves every epoch a short last
# step; with 2 processes one rank's share of it is partly or only filler
SHORT_STEP_CASES = {
    "mb2": (5, 2, 1, 1, 2),  # 3 steps an epoch, the last 1 row
    "accum2": (7, 1, 2, 1, 2),  # the short step's second micro-batch is all filler
    "world2": (7, 1, 1, 2, 2),  # rank 1 reads only filler in the short step
    "world2-accum2": (11, 2, 2, 2, 3),  # 8 rows a step, the last 3: rank 0 2 rows, rank 1 1
}


@pytest.mark.parametrize("case", SHORT_STEP_CASES)
def test_short_last_step_trains_the_torch_backends_rows_filled_to_the_batch_shape(case, tmp_path):
    """MindSpore trains torch's steps: core's schedule without `drop_last`, each rank the rows of
    torch's micro-batches (read back through MindDataset's sharding, identified by their
    tokens), the short step filled at its end with records of no token and no trained label, so
    the loss's trained-token count and sft's token accounting are torch's."""
    from sft_mindspore.train import schedule_tokens

    n, micro, accum, world, epochs = SHORT_STEP_CASES[case]
    split = synthetic_split(n=n, seed=4)
    config = _config(
        epochs=epochs, micro_batch_size=micro, gradient_accumulation_steps=accum, world=world
    )
    schedule = build_schedule(split, config, world=world)
    core = Schedule.for_split(split, config, packing=False, rank=0, world=world)
    assert schedule.steps == [rows for _, rows in core.steps()]  # same count, same rows
    assert len(schedule.steps) == epochs * -(-n // (micro * accum * world))
    assert schedule.epochs == [pos.epoch for pos, _ in core.steps()]
    short = [s for s, rows in enumerate(schedule.steps) if len(rows) < schedule.rows_per_step]
    assert len(short) == epochs and schedule.dropped_rows == 0
    assert schedule.filler_rows == epochs * (schedule.rows_per_step - n % schedule.rows_per_step)
    path = write_training_data(split, schedule, pad_id=0, out_dir=tmp_path)
    saved = json.loads((tmp_path / "schedule.json").read_text())
    assert saved["steps"] == schedule.steps and saved["filler_rows"] == schedule.filler_rows
    sample_of = {tuple(split.sample(i)[0].tolist()): i for i in range(len(split))}
    tokens = schedule_tokens(
        SimpleNamespace(data=SimpleNamespace(train=split), config=config), schedule
    )
    per_rank = schedule.rows_per_step // world
    for rank in range(world):
        recs = (
            read_mindrecord(path, num_shards=world, shard_id=rank)
            if world > 1
            else (read_mindrecord(path))
        )
        assert len(recs) == per_rank * len(schedule.steps)
        torch_rank = Schedule.for_split(split, config, packing=False, rank=rank, world=world)
        for s, step in enumerate(schedule.steps):
            mine = recs[s * per_rank : (s + 1) * per_rank]
            real = [r for r in mine if (r["input_ids"] != 0).any()]
            filler = [r for r in mine if not (r["input_ids"] != 0).any()]
            ids = [sample_of[tuple(r["input_ids"][r["input_ids"] != 0].tolist())] for r in real]
            want = [i for mb in torch_rank.micro_batches(step) for row in mb for i in row]
            assert ids == want, (case, s + 1, rank, ids, want)
            assert all((r["labels"] == IGNORE_INDEX).all() for r in filler), (case, s + 1)
            trained = sum(int((r["labels"][1:] != IGNORE_INDEX).sum()) for r in mine)
            assert trained == count_trained(split, shard_for_rank(step, rank, world))
            if world > 1:
                assert tokens[s].trained_ranks[rank] == trained, (case, s + 1, rank)
            else:
                assert tokens[s].trained == trained
            if s in short and world > 1 and not want:
                assert trained == 0  # a rank whose share is only filler: 0 trained tokens
    for s, step in enumerate(schedule.steps):
        assert tokens[s].trained == count_trained(split, step)
        assert tokens[s].tokens == sum(len(split.sample(i)[0]) for row in step for i in row)


def test_sft_write_data_hook_writes_mindrecord(tmp_path):
    split = synthetic_split(n=3)
    data = PreparedData(
        cache_dir=tmp_path / "cache",
        key="k",
        train=split,
        eval=split,
        tokenizer_dir=str(tmp_path),
        pad_id=0,
        eos_ids=[2],
    )
    hook = get_plugins().hook
    config = _config()
    assert (
        hook.sft_write_data(
            fmt="parquet-nope", data=data, out_dir=str(tmp_path / "o"), config=config
        )
        is None
    )
    out = hook.sft_write_data(
        fmt="mindrecord", data=data, out_dir=str(tmp_path / "o"), config=config
    )
    recs = read_mindrecord(out)
    got = sorted(r["input_ids"][r["input_ids"] != 0].tolist() for r in recs)
    assert got == sorted(split.sample(i)[0].tolist() for i in range(3))
    assert (tmp_path / "o" / "eval.mindrecord").is_file()


def test_hf_arrow_alternative_holds_the_same_records(tmp_path):
    import datasets

    split = synthetic_split(n=3)
    data = PreparedData(
        cache_dir=tmp_path / "cache",
        key="k",
        train=split,
        eval=None,
        tokenizer_dir=str(tmp_path),
        pad_id=0,
        eos_ids=[2],
    )
    hook = get_plugins().hook
    mr = hook.sft_write_data(
        fmt="mindrecord", data=data, out_dir=str(tmp_path / "m"), config=_config()
    )
    arrow = hook.sft_write_data(
        fmt="hf-arrow", data=data, out_dir=str(tmp_path / "a"), config=_config()
    )
    table = datasets.load_from_disk(arrow)
    records = read_mindrecord(mr)
    assert table.column_names == ["input_ids", "labels"] and len(table) == len(records) == 3
    for row, rec in zip(table, records):
        assert row["input_ids"] == rec["input_ids"].tolist()
        assert row["labels"] == rec["labels"].tolist()
