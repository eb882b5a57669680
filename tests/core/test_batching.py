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


# Mutation testing (`make mutate`, docs/CONTRIBUTING.md) found the behaviours below unchecked.


def test_epoch_rows_shuffle_is_seeded_per_epoch_and_off_means_file_order() -> None:
    lengths = [5] * 20
    kw = {"max_seq_len": 8, "packing": False, "seed": 3}
    plain = epoch_rows(lengths, shuffle=False, epoch=0, **kw)
    assert plain == [[i] for i in range(20)]  # no shuffle: file order, not grouped by default
    a = epoch_rows(lengths, shuffle=True, epoch=0, **kw)
    assert a == epoch_rows(lengths, shuffle=True, epoch=0, **kw)  # the seed decides
    assert a != plain and sorted(a) == plain
    assert epoch_rows(lengths, shuffle=True, epoch=1, **kw) != a  # a new order each epoch
    assert epoch_rows(lengths, shuffle=True, epoch=0, max_seq_len=8, packing=False, seed=4) != a


def test_group_by_length_sorts_each_window_of_64_groups_longest_first() -> None:
    # 2 rows per group -> windows of 128 rows; 300 rows = two full windows and a partial one
    lengths = [(7 * i) % 50 + 1 for i in range(300)]
    rows = epoch_rows(
        lengths,
        max_seq_len=64,
        packing=False,
        shuffle=False,
        seed=0,
        epoch=0,
        group_by_length=True,
        rows_per_group=2,
    )
    order = [r[0] for r in rows]
    assert sorted(order) == list(range(300))  # every sample once
    one = {"max_seq_len": 64, "packing": False, "shuffle": False, "seed": 0, "epoch": 0}
    assert epoch_rows(lengths, group_by_length=True, **one) == [[i] for i in range(300)]  # 1/group
    for s, e in [(0, 128), (128, 256), (256, 300)]:
        window = order[s:e]
        assert set(window) == set(range(s, e)), f"window {s}:{e} mixes other rows"
        assert [lengths[i] for i in window] == sorted((lengths[i] for i in window), reverse=True)


def test_steps_per_epoch_counts_or_drops_the_short_last_step() -> None:
    assert steps_per_epoch(10, 4) == 3 and steps_per_epoch(10, 4, drop_last=True) == 2
    assert isinstance(steps_per_epoch(10, 4, drop_last=True), int)
    assert steps_per_epoch(8, 4) == steps_per_epoch(8, 4, drop_last=True) == 2


def test_count_trained_counts_labels_after_the_first_token() -> None:
    # sample i: 2 masked tokens then i trained ones; the shifted loss never predicts token 0
    s = split()
    assert count_trained(s, [[0], [1], [2]]) == 0 + 1 + 2
    assert count_trained(s, [[5, 4]]) == 5 + 4
    first_trained = TokenizedSplit.from_samples([([1, 2, 3], [1, 2, 3])])
    assert count_trained(first_trained, [[0]]) == 2  # label 0 is never a target


def test_collate_pads_to_pad_to_with_int64_arrays() -> None:
    b = collate(split(), [[0], [1]], pad_id=9, pad_to=8)
    for key in ("input_ids", "labels", "position_ids", "attention_mask", "sample_index"):
        assert b[key].dtype == np.int64, key
    assert b["input_ids"].shape == (2, 8)
    assert b["input_ids"][0].tolist() == [1, 2] + [9] * 6
    assert b["attention_mask"][1].tolist() == [1, 1, 1] + [0] * 5
    # three samples in one packed row follow each other (the write offset accumulates)
    b = collate(split(), [[0, 1, 2]], pad_id=0)
    assert b["input_ids"][0].tolist() == [1, 2, 11, 12, 13, 21, 22, 23, 24]
    assert b["position_ids"][0].tolist() == [0, 1, 0, 1, 2, 0, 1, 2, 3]
    assert b["seq_lens"] == [[2, 3, 4]] and b["sample_index"][0].tolist() == [0, 1, 2]
