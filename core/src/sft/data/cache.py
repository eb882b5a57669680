"""The tokenized cache: what every backend trains on, as flat numpy arrays on disk.

One split (train or eval) is a directory holding

    input_ids.npy   int32 [T]     all samples' token ids, concatenated
    labels.npy      int32 [T]     the token id where it is trained, -100 where masked; NOT shifted
                                  (position t is the target predicted from position t-1)
    offsets.npy     int64 [N+1]   sample i is input_ids[offsets[i]:offsets[i+1]]
    sources.json    [N] strings   where each sample came from, e.g. "data/train.jsonl:12"

Example: two samples [1, 2, 3] (labels [-100, 2, 3]) and [4, 5] (labels [-100, 5]) give
input_ids [1 2 3 4 5], labels [-100 2 3 -100 5], offsets [0 3 5].

Arrays are memory-mapped on load, so a cache larger than memory still trains. Preparation
writes them without holding them: samples are appended to a `Spool` (flat files) as they are
encoded, and `write_split` copies them into the split's files in the final order (hold-out and
mixing choose that order over per-sample index arrays), so memory stays flat however large the
data is:

    spool = Spool(tmp / "spool-0")
    spool.append([1, 2, 3], [-100, 2, 3], "a.jsonl:1", record=0)
    spool.append([4, 5], [-100, 5], "a.jsonl:2", record=1)
    spool.close()
    write_split(out / "train", [spool], [(0, np.arange(2))])   # the example above, on disk
"""

from __future__ import annotations

import contextlib
import json
import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

IGNORE_INDEX = -100
SPLIT_FILES = ("input_ids.npy", "labels.npy", "sources.json")
COPY_BLOCK = 1 << 20  # bytes read at once when copying a run of spooled samples


class LazySources(Sequence[str]):
    """A split's sources.json, parsed on first use: one string per sample is a large list for a
    large dataset, and preparing, stats and most training steps never look at it."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._items: list[str] | None = None

    def _load(self) -> list[str]:
        if self._items is None:
            self._items = json.loads(self._path.read_text())
        return self._items

    def __getitem__(self, i: Any) -> Any:
        return self._load()[i]

    def __len__(self) -> int:
        return len(self._load())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and self._load() == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable-list semantics, like list


@dataclass
class TokenizedSplit:
    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    sources: Sequence[str]

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
        (d / "sources.json").write_text(json.dumps(list(self.sources)))

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TokenizedSplit:
        d = Path(directory)
        return cls(
            np.load(d / "input_ids.npy", mmap_mode="r"),
            np.load(d / "labels.npy", mmap_mode="r"),
            np.load(d / "offsets.npy"),
            LazySources(d / "sources.json"),
        )


class Spool:
    """Encoded samples appended to flat files in `directory` (ids and labels as int32, each
    source as its JSON string); in memory only four numbers per sample: its length, record
    number, trained-token count and the end of its source string (`array`s, 32 bytes/sample)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        # held open across appends, closed by close()
        self._files = {k: open(directory / k, "wb") for k in ("ids", "labels", "where")}  # noqa: SIM115
        self.ends, self.records, self.trained, self.where_ends = (array("q") for _ in range(4))

    def append(self, ids: Any, labels: Any, where: str, record: int) -> None:
        lab = np.asarray(labels, dtype=np.int32)
        self._files["ids"].write(np.asarray(ids, dtype=np.int32).tobytes())
        self._files["labels"].write(lab.tobytes())
        # json.dumps(list) joins its items with ", ": written in any order, they stay that list
        self.where_ends.append(
            (self.where_ends[-1] if self.where_ends else 0)
            + self._files["where"].write(json.dumps(where).encode() + b", ")
        )
        self.ends.append((self.ends[-1] if self.ends else 0) + len(lab))
        self.records.append(record)
        self.trained.append(int(np.count_nonzero(lab[1:] != IGNORE_INDEX)))

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()

    def __len__(self) -> int:
        return len(self.ends)


Selection = list[tuple[int, np.ndarray]]
"""A split's samples in order: (spool number, sample indices in that spool) segments."""


def write_split(directory: Path, spools: Sequence[Spool], order: Selection) -> tuple[int, int]:
    """The split files (same bytes as `TokenizedSplit.save`) of the spooled samples in `order`,
    copied run by run (consecutive samples of one spool are one read); returns (samples,
    trained tokens). Memory: the offsets of the split and one COPY_BLOCK."""
    directory.mkdir(parents=True, exist_ok=True)
    ends = [np.frombuffer(s.ends, dtype=np.int64) for s in spools]
    wends = [np.frombuffer(s.where_ends, dtype=np.int64) for s in spools]
    lengths = [np.diff(e, prepend=0) for e in ends]
    sel_lengths = [lengths[p][idx] for p, idx in order]
    offsets = np.zeros(sum(len(x) for x in sel_lengths) + 1, dtype=np.int64)
    if len(offsets) > 1:
        np.cumsum(np.concatenate(sel_lengths), out=offsets[1:])
    trained = sum(
        int(np.frombuffer(spools[p].trained, dtype=np.int64)[idx].sum()) for p, idx in order
    )
    with contextlib.ExitStack() as stack:
        outs = {k: stack.enter_context(open(directory / k, "wb")) for k in SPLIT_FILES}
        header = {"descr": "<i4", "fortran_order": False, "shape": (int(offsets[-1]),)}
        for name in ("input_ids.npy", "labels.npy"):  # np.save's header (format 1.0)
            np.lib.format.write_array_header_1_0(outs[name], header)
        outs["sources.json"].write(b"[")
        ins = {
            (p, k): stack.enter_context(open(spools[p].dir / k, "rb"))
            for p, _ in order
            for k in ("ids", "labels", "where")
        }
        for p, a, b in _runs(order):
            tok = (int(ends[p][a - 1]) if a else 0) * 4, int(ends[p][b - 1]) * 4
            src = int(wends[p][a - 1]) if a else 0, int(wends[p][b - 1])
            _copy(ins[p, "ids"], outs["input_ids.npy"], *tok)
            _copy(ins[p, "labels"], outs["labels.npy"], *tok)
            _copy(ins[p, "where"], outs["sources.json"], *src)
        if len(offsets) > 1:
            outs["sources.json"].seek(-2, os.SEEK_CUR)  # the last item's ", "
            outs["sources.json"].truncate()
        outs["sources.json"].write(b"]")
    np.save(directory / "offsets.npy", offsets)
    return len(offsets) - 1, trained


def _runs(order: Selection) -> Iterator[tuple[int, int, int]]:
    """(spool, first, end) of each run of consecutive samples in `order`."""
    for p, idx in order:
        if not len(idx):
            continue
        cut = np.flatnonzero(np.diff(idx) != 1) + 1
        for s, e in zip(np.r_[0, cut].tolist(), np.r_[cut, len(idx)].tolist(), strict=True):
            yield p, int(idx[s]), int(idx[e - 1]) + 1


def _copy(src: BinaryIO, dst: BinaryIO, start: int, end: int) -> None:
    src.seek(start)
    while start < end:
        block = src.read(min(COPY_BLOCK, end - start))
        dst.write(block)
        start += len(block)


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
        self.save_meta()

    def save_meta(self) -> None:
        """meta.json, written last: it marks the cache complete (splits written before)."""
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
