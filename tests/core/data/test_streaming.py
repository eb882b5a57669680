"""Preparation streams: memory stays flat as the dataset grows (samples go to the cache files as
they are encoded, never into one list), and data workers get a bounded window of chunks.

    $ .venvs/torch/bin/python -m pytest tests/core/data/test_streaming.py -q
"""

from __future__ import annotations

import itertools
import random
import tracemalloc
from pathlib import Path

import sft.data.cache as cache
import sft.data.pipeline as pipeline
from sft.data.pipeline import load_or_build

from tests.core.data.conftest import chat, make_config, write_jsonl

WORDS = "the model data token train loss batch step answer question river stone".split()


def _peak_bytes(tmp_path: Path, tokenizer: Path, n: int) -> tuple[int, int]:
    """(tracemalloc peak while preparing `n` long chats, tokens prepared)."""
    rng = random.Random(n)
    src = write_jsonl(
        tmp_path / f"{n}.jsonl",
        [chat(f"Question {i}?", " ".join(rng.choices(WORDS, k=150))) for i in range(n)],
    )
    cfg = make_config(
        tmp_path, {"train": str(src), "max_seq_len": 4096, "cache_dir": str(tmp_path / f"c{n}")}
    )
    tracemalloc.start()
    try:
        data = load_or_build(cfg, tokenizer)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(data.train) == n
    return peak, int(data.train.offsets[-1])


def test_preparation_memory_does_not_grow_with_the_dataset(tiny_tokenizer, tmp_path, monkeypatch):
    # Small chunks (records encoded at once, bytes copied at once), so that one is a small part
    # of either dataset; encoding in this process.
    monkeypatch.setattr(pipeline, "BATCH", 8)
    monkeypatch.setattr(cache, "COPY_BLOCK", 1 << 14, raising=False)
    monkeypatch.setenv("SFT_DATA_WORKERS", "1")
    _peak_bytes(tmp_path, tiny_tokenizer, 4)  # imports and template compile
    small, small_tokens = _peak_bytes(tmp_path, tiny_tokenizer, 40)
    large, large_tokens = _peak_bytes(tmp_path, tiny_tokenizer, 160)
    # 4x the samples: holding them would add at least their int32 ids and labels (8 bytes a
    # token) to the peak; streaming adds per-sample bookkeeping only (offsets, source strings).
    added_token_bytes = 8 * (large_tokens - small_tokens)
    assert large - small < 0.1 * added_token_bytes, (
        f"peak {small / 2**20:.2f} MiB for 40 samples ({small_tokens} tokens), "
        f"{large / 2**20:.2f} MiB for 160 ({large_tokens} tokens): grew by "
        f"{(large - small) / added_token_bytes:.0%} of the added tokens' int32 ids+labels"
    )


class _NoEncoder:
    def encode(self, convs):
        return []


def _no_encoder():
    return None, _NoEncoder()


def test_workers_are_fed_a_bounded_window_of_chunks():
    from sft.data import workers
    from sft.data.workers import EncodePool

    ahead_per_worker = getattr(workers, "AHEAD", 2)

    pulled = itertools.count()

    def jobs():  # chunks of one bad record each (no tokenizer needed to account them)
        for i in range(1000):
            next(pulled)
            yield None, None, [(i, f"x.jsonl:{i + 1}", None, ("malformed_json", "bad"), None)]

    with EncodePool(None, None, workers=2, init=(_no_encoder, ())) as pool:  # type: ignore[arg-type]
        outcomes = pool.map(jobs())
        first = next(outcomes)
        ahead = next(pulled)  # how many chunks were read from the source so far
        rest = list(outcomes)
    assert first == [("bad", "x.jsonl:1", "malformed_json", "bad")] and len(rest) == 999
    assert [o[0][1] for o in rest[:3]] == ["x.jsonl:2", "x.jsonl:3", "x.jsonl:4"]  # in order
    assert ahead <= ahead_per_worker * 2 + 1, (
        f"{ahead} of 1000 chunks read before the first came back"
    )


def test_spooled_samples_are_written_in_any_order_as_the_in_memory_split(tmp_path):
    import numpy as np
    from sft.data.cache import Spool, TokenizedSplit, write_split

    a = [([1, 2, 3], [-100, 2, 3], "a.jsonl:1"), ([4, 5], [-100, 5], "a.jsonl:2")]
    a.append(([6], [-100], "a.jsonl:3"))
    b = [([7, 8], [-100, -100], "b.jsonl:1"), ([9, 10, 11], [-100, -100, 11], 'b "x".jsonl:2')]
    spools = []
    for name, samples in (("a", a), ("b", b)):
        spool = Spool(tmp_path / "spool" / name)
        for n, (ids, labels, where) in enumerate(samples):
            spool.append(ids, labels, where, record=n)
        spool.close()
        spools.append(spool)
    # mixing order: b's second sample, a's third twice (repeated), a's first two (one run of
    # consecutive samples), b's first
    order = [(1, np.array([1])), (0, np.array([2, 2, 0, 1])), (1, np.array([0]))]
    picked = [b[1], a[2], a[2], a[0], a[1], b[0]]
    assert write_split(tmp_path / "streamed", spools, order) == (6, 1 + 0 + 0 + 2 + 1 + 0)
    expected = TokenizedSplit.from_samples(
        [(i, lab) for i, lab, _ in picked], [w for *_, w in picked]
    )
    expected.save(tmp_path / "in-memory")
    for f in ("input_ids.npy", "labels.npy", "offsets.npy", "sources.json"):
        assert (tmp_path / "streamed" / f).read_bytes() == (
            tmp_path / "in-memory" / f
        ).read_bytes(), f
    loaded = TokenizedSplit.load(tmp_path / "streamed")
    assert loaded.input_ids.tolist() == [9, 10, 11, 6, 6, 1, 2, 3, 4, 5, 7, 8]
    assert loaded.offsets.tolist() == [0, 3, 4, 5, 8, 10, 12]
    assert loaded.sources[0] == 'b "x".jsonl:2'
    # an empty split is an empty list of sources, not a truncated "["
    assert write_split(tmp_path / "empty", spools, [(0, np.array([], dtype=np.int64))]) == (0, 0)
    assert TokenizedSplit.load(tmp_path / "empty").sources == []
