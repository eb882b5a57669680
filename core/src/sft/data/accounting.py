"""Record accounting and the length policy: every record ends trained, dropped (reason) or
rejected (file:line, reason), and the totals always add up.

    acc = Accounting(on_bad_record="skip")
    acc.reject("a.jsonl:3", RecordError("malformed_json", "..."))
    pieces = apply_length(ids, labels, max_seq_len=2048, policy="truncate", acc=acc, ...)
    print(acc.summary_line())
    # data: 1000 records -> 950 trained (12 truncated), 30 dropped (too_long 25, ...), 20 rejected (...)
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sft.data.cache import IGNORE_INDEX
from sft.data.conversation import RecordError
from sft.errors import SftError

Sample = tuple[np.ndarray, np.ndarray]


@dataclass
class Accounting:
    on_bad_record: str = "error"
    records: int = 0
    trained: int = 0
    samples: int = 0
    truncated: int = 0
    split: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    rejects_path: Path | None = None
    """Where each reject is appended as a JSON line when it happens (rejects.jsonl), so a file
    of many bad records costs no memory; without it they are kept in `rejects`."""
    rejects: list[dict[str, Any]] = field(default_factory=list)
    first_rejects: list[dict[str, Any]] = field(default_factory=list)
    """The first few rejects (for error messages), kept either way."""

    def reject(self, where: str, err: RecordError) -> None:
        """A bad record: stop (`on_bad_record: error`) or count it and keep it for rejects.jsonl."""
        if self.on_bad_record == "error":
            raise SftError(
                f"{where}: bad record ({err.kind}): {err.reason}. Fix the record, or set "
                "data.on_bad_record: skip to count and skip bad records (written to rejects.jsonl)"
            )
        self.records += 1
        self.rejected[err.kind] += 1
        rec = {"where": where, "reason": err.kind, "detail": err.reason}
        if len(self.first_rejects) < 3:
            self.first_rejects.append(rec)
        if self.rejects_path is None:
            self.rejects.append(rec)
            return
        self.rejects_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.rejects_path, "a", encoding="utf-8") as fh:  # rare: opened per reject
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def drop(self, where: str, reason: str) -> None:
        self.records += 1
        self.dropped[reason] += 1

    def keep(self, pieces: int, truncated: bool) -> None:
        self.records += 1
        self.trained += 1
        self.samples += pieces
        self.truncated += int(truncated)
        self.split += int(pieces > 1)

    def check_totals(self) -> None:
        total = self.trained + sum(self.dropped.values()) + sum(self.rejected.values())
        assert total == self.records, f"accounting bug: {total} != {self.records}"

    def as_dict(self) -> dict[str, Any]:
        self.check_totals()
        return {
            "records": self.records,
            "trained": self.trained,
            "samples": self.samples,
            "truncated": self.truncated,
            "split": self.split,
            "dropped": dict(sorted(self.dropped.items())),
            "rejected": dict(sorted(self.rejected.items())),
        }

    def write_rejects(self, path: Path) -> None:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rejects))


def summary_line(acc: dict[str, Any], name: str = "data") -> str:
    """One line a user reads before training starts."""

    def reasons(c: dict[str, int]) -> str:
        return f" ({', '.join(f'{k} {v}' for k, v in c.items())})" if c else ""

    notes = [f"{acc[k]} {k}" for k in ("truncated", "split") if acc.get(k)]
    return (
        f"{name}: {acc['records']} records -> {acc['trained']} trained"
        + (f" ({', '.join(notes)})" if notes else "")
        + f", {sum(acc['dropped'].values())} dropped{reasons(acc['dropped'])}"
        + f", {sum(acc['rejected'].values())} rejected{reasons(acc['rejected'])}"
        + f"; {acc['samples']} samples"
    )


def has_trained(labels: np.ndarray) -> bool:
    """A sample trains on something: a labelled token after its first (never predicted)."""
    return bool(np.any(labels[1:] != IGNORE_INDEX))


def apply_length(
    sample: Sample, *, where: str, max_seq_len: int, policy: str, plain: bool, acc: Accounting
) -> list[Sample]:
    """The pieces of a sample to train on under the length policy (empty: dropped, counted)."""
    ids, labels = sample
    n = len(ids)
    if n <= max_seq_len:
        pieces = [sample]
    elif policy == "error":
        raise SftError(
            f"{where}: sample has {n} tokens > data.max_seq_len {max_seq_len}. Raise max_seq_len "
            "or set data.length_policy to drop / truncate (or split, for the text format)"
        )
    elif policy == "drop":
        acc.drop(where, "too_long")
        return []
    elif policy == "truncate" or (policy == "split" and not plain):
        if policy == "split":
            raise SftError(
                f"{where}: data.length_policy split only applies to the text format (cutting a "
                "conversation would orphan its turns); use truncate or drop"
            )
        pieces = [(ids[:max_seq_len], labels[:max_seq_len])]
    else:  # split text into consecutive windows
        pieces = [
            (ids[s : s + max_seq_len], labels[s : s + max_seq_len])
            for s in range(0, n, max_seq_len)
        ]
    pieces = [p for p in pieces if has_trained(p[1])]
    if not pieces:
        acc.drop(where, "no_trained_tokens")
        return []
    acc.keep(len(pieces), truncated=n > max_seq_len and policy == "truncate")
    return pieces
