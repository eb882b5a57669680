"""The tokenized cache: what every backend trains on, as flat numpy arrays on disk.

One split (train or eval) is a directory holding

    input_ids.npy   int32 [T]     all samples' token ids, concatenated
    labels.npy      int32 [T]     the token id where it is trained, -100 where masked; NOT shifted
                                  (position t is the target predicted from position t-1)
    offsets.npy     int64 [N+1]   sample i is input_ids[offsets[i]:offsets[i+1]]
    sources.json    [N] strings   where each sample came from, e.g. "data/train.jsonl:12"

Example: two samples [1, 2, 3] (labels [-100, 2, 3]) and [4, 5] (labels [-100, 5]) give
input_ids [1 2 3 4 5], labels [-100 2 3 -100 5], offsets [0 3 5].

Arrays are memory-mapped on load, so a cache larger than memory still trains.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

IGNORE_INDEX = -100


@dataclass
class TokenizedSplit:
    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    sources: list[str]

    @classmethod
    def from_samples(
        cls, samples: list[tuple[list[int], list[int]]], sources: list[str] | None = None
    ) -> TokenizedSplit:
        """Build from (ids, labels) pairs; used by the pipeline and by tests."""
        lengths = [len(ids) for ids, _ in samples]
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter(
            (t for s, _ in samples for t in s), dtype=np.int32, count=int(offsets[-1])
        )
        lab = np.fromiter(
            (t for _, s in samples for t in s), dtype=np.int32, count=int(offsets[-1])
        )
        return cls(ids, lab, offsets, sources or [f"#{i}" for i in range(len(samples))])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[a:b], self.labels[a:b]

    def trained_tokens(self) -> int:
        """Tokens with a label, not counting each sample's first token (never predicted)."""
        trained = self.labels != IGNORE_INDEX
        starts = self.offsets[:-1][self.lengths > 0]
        return int(trained.sum() - trained[starts].sum())

    def save(self, directory: str | os.PathLike[str]) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "input_ids.npy", np.asarray(self.input_ids, dtype=np.int32))
        np.save(d / "labels.npy", np.asarray(self.labels, dtype=np.int32))
        np.save(d / "offsets.npy", np.asarray(self.offsets, dtype=np.int64))
        (d / "sources.json").write_text(json.dumps(self.sources))

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TokenizedSplit:
        d = Path(directory)
        return cls(
            np.load(d / "input_ids.npy", mmap_mode="r"),
            np.load(d / "labels.npy", mmap_mode="r"),
            np.load(d / "offsets.npy"),
            json.loads((d / "sources.json").read_text()),
        )


@dataclass
class PreparedData:
    """A tokenized cache ready for training: splits plus everything about how it was made."""

    cache_dir: Path
    """Directory of this cache (`train/`, `eval/`, `meta.json`)."""
    key: str
    """Content hash of data bytes, tokenizer, template, policies and pipeline version."""
    train: TokenizedSplit
    eval: TokenizedSplit | None
    tokenizer_dir: str
    """Directory of the tokenizer (with the chat template used) to save beside weights."""
    pad_id: int
    """Token id used for padding (never trained)."""
    eos_ids: list[int] = field(default_factory=list)
    """Token ids that end an assistant turn in this template (for generation_config.json)."""
    stats: dict[str, Any] = field(default_factory=dict)
    """Record accounting and length statistics (see `sft data stats`)."""

    def meta(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "tokenizer_dir": self.tokenizer_dir,
            "pad_id": self.pad_id,
            "eos_ids": self.eos_ids,
            "stats": self.stats,
        }

    def save(self) -> None:
        self.train.save(self.cache_dir / "train")
        if self.eval is not None:
            self.eval.save(self.cache_dir / "eval")
        tmp = self.cache_dir / "meta.json.tmp"
        tmp.write_text(json.dumps(self.meta(), indent=2))
        os.replace(tmp, self.cache_dir / "meta.json")  # meta.json last: marks the cache complete

    @classmethod
    def load(cls, cache_dir: str | os.PathLike[str]) -> PreparedData:
        d = Path(cache_dir)
        meta = json.loads((d / "meta.json").read_text())
        return cls(
            cache_dir=d,
            key=meta["key"],
            train=TokenizedSplit.load(d / "train"),
            eval=TokenizedSplit.load(d / "eval") if (d / "eval").is_dir() else None,
            tokenizer_dir=meta["tokenizer_dir"],
            pad_id=meta["pad_id"],
            eos_ids=meta.get("eos_ids", []),
            stats=meta.get("stats", {}),
        )
