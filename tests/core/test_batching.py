"""Batching shared by all backends: packing, step schedule, rank shards and collation."""

from __future__ import annotations

import numpy as np
from sft.data.batching import (
    collate,
    count_trained,
    epoch_rows,
    global_steps,
    micro_batches,
    pack_rows,
    shard_for_rank,
    steps_per_epoch,
)
from sft.data.cache import IGNORE_INDEX, TokenizedSplit


def split() -> TokenizedSplit:
    # sample i has i+2 tokens; labels train everything but the first two tokens
    samples = []
    for i in range(6):
        ids = list(range(10 * i + 1, 10 * i + 3 + i))
        labels = [IGNORE_INDEX, IGNORE_INDEX, *ids[2:]]
        samples.append((ids, labels))
    return TokenizedSplit.from_samples(samples)


def test_pack_rows_best_fit_decreasing() -> None:
    assert pack_rows([3, 7, 4], 8) == [[1], [2, 0]]
    rows = pack_rows([5, 5, 5, 3, 3, 2], 8)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum([5, 5, 5, 3, 3, 2][i] for i in r) <= 8 for r in rows)
    assert len(rows) == 3


def test_epoch_rows_deterministic_and_complete() -> None:
    lengths = split().lengths
    a = epoch_rows(lengths, max_seq_len=8, packing=True, shuffle=True, seed=1, epoch=0)
    b = epoch_rows(lengths, max_seq_len=8, packing=True, shuffle=True, seed=1, epoch=0)
    c = epoch_rows(lengths, max_seq_len=8, packing=False, shuffle=True, seed=1, epoch=1)
    assert a == b
    assert sorted(i for r in a for i in r) == list(range(6))
    assert sorted(r[0] for r in c) == list(range(6))


def test_group_by_length_keeps_every_sample() -> None:
    lengths = np.array([5, 1, 9, 3, 7, 2, 8, 4])
    rows = epoch_rows(
        lengths,
        max_seq_len=16,
        packing=False,
        shuffle=True,
        seed=0,
        epoch=0,
        group_by_length=True,
        rows_per_group=2,
    )
    flat = [r[0] for r in rows]
    assert sorted(flat) == list(range(8))
    pairs = [flat[i : i + 2] for i in range(0, 8, 2)]
    assert all(abs(int(lengths[p[0]]) - int(lengths[p[1]])) <= 2 for p in pairs)


def test_steps_shards_and_micro_batches() -> None:
    rows = [[i] for i in range(10)]
    steps = list(global_steps(rows, 4))
    assert [len(s) for s in steps] == [4, 4, 2] and steps_per_epoch(10, 4) == 3
    assert list(global_steps(rows, 4, drop_last=True))[-1] == [[4], [5], [6], [7]]
    assert shard_for_rank(steps[0], 0, 2) == [[0], [2]]
    assert shard_for_rank(steps[0], 1, 2) == [[1], [3]]
    assert micro_batches(steps[0], 3) == [[[0], [1], [2]], [[3]]]


def test_collate_packed_row() -> None:
    s = split()
    batch = collate(s, [[0, 1], [2]], pad_id=0)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"][0].tolist() == [1, 2, 11, 12, 13]
    assert batch["position_ids"][0].tolist() == [0, 1, 0, 1, 2]
    # each sample's first token is never a target (no prediction across the sample boundary)
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 4 + [13]
    assert batch["input_ids"][1].tolist() == [21, 22, 23, 24, 0]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 23, 24, IGNORE_INDEX]
    assert batch["seq_lens"] == [[2, 3], [4]]
    assert batch["sample_index"].tolist() == [[0, 1], [2, -1]]
    assert count_trained(s, [[0, 1], [2]]) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_split_save_load_roundtrip(tmp_path) -> None:
    s = split()
    s.save(tmp_path / "train")
    t = TokenizedSplit.load(tmp_path / "train")
    assert np.array_equal(s.input_ids, t.input_ids) and np.array_equal(s.labels, t.labels)
    assert t.sources == s.sources and len(t) == 6
    assert t.trained_tokens() == sum(len(s.sample(i)[0]) - 2 for i in range(6))
