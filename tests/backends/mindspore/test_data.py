"""The tokenized cache as MindRecord: MindDataset reads back exactly the cache's ids and labels,
rows come in core batching order, and data-parallel shards are core's `shard_for_rank`.

    $ .venvs/ms/bin/python -m pytest tests/backends/mindspore/test_data.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("mindspore")

from sft.data.batching import shard_for_rank
from sft.data.cache import IGNORE_INDEX, PreparedData, TokenizedSplit
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


def _config(**train) -> RunConfig:
    return RunConfig.model_validate(
        {
            "backend": "mindspore",
            "data": {"train": "x.jsonl", "max_seq_len": 64},
            "train": {"micro_batch_size": 2, **train},
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


def test_schedule_drops_only_incomplete_steps_and_counts_them():
    split = synthetic_split(n=5)
    schedule = build_schedule(split, _config(epochs=2), world=1)
    assert len(schedule.steps) == 4 and schedule.dropped_rows == 2
    assert all(len(s) == 2 for s in schedule.steps)


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
