"""Records -> (ids, labels) in chunks, in this process or in forked worker processes.

Rendering chat templates is Python (Jinja) and dominates preparation next to tokenization, so
large datasets are spread over processes: chunks of raw records go out in order, outcomes come
back in order (`imap`), and the parent does the accounting, so counts, rejects and sample order
are identical to a single-process run.

    with EncodePool(plugins, encoder, workers=4) as pool:
        for outcomes in pool.map(jobs):     # jobs: (format, DataSource, [(n, where, data, ...)])
            ...                             # ("ok", where, n, plain, ids, labels) | ("bad", where, kind, reason)

Workers: `SFT_DATA_WORKERS` if set, else one per CPU but one (at most 8, at least 2) for inputs
over 1 MiB, else none.
Needs the `fork` start method (Linux); elsewhere everything runs in this process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from sft.data.conversation import RecordError
from sft.data.formats import convert_record
from sft.data.masks import Encoder
from sft.data.sources import RawRecord

# (format, DataSource, [(record number, where, data, (kind, reason) of a bad record, JSON line)])
Chunk = list[tuple[int, str, dict[str, Any] | None, tuple[str, str] | None, str | None]]
Job = tuple[str | None, Any, Chunk]
Outcome = tuple[Any, ...]

# Set in the parent before forking, inherited by the workers (tokenizers are not cheap to pickle).
_STATE: dict[str, Any] = {}


def default_workers(files: list[Path]) -> int:
    env = os.environ.get("SFT_DATA_WORKERS")
    if env:
        return max(1, int(env))
    if "fork" not in mp.get_all_start_methods():
        return 1
    # The parent reads, parses and accounts: it keeps a core, workers get the others.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min((cpus or 1) - 1, 8)
    size = sum(f.stat().st_size for f in files if f.is_file())
    return workers if workers >= 2 and size > (1 << 20) else 1


def encode_job(job: Job) -> list[Outcome]:
    """Convert and encode one chunk of raw records; outcomes in record order."""
    fmt, src, chunk = job
    plugins, encoder = _STATE["plugins"], _STATE["encoder"]
    out: list[Outcome | None] = [None] * len(chunk)
    convs, slots = [], []
    for j, (n, where, data, err, raw) in enumerate(chunk):
        if raw is not None:  # JSON lines are parsed here, in the worker
            rec = RawRecord(where, None, raw=raw).parsed(getattr(src, "columns", None))
            data, err = rec.data, (rec.error.kind, rec.error.reason) if rec.error else None
        if data is None or fmt is None:
            kind, reason = err or ("missing_field", "no format detected")
            out[j] = ("bad", where, kind, reason)
            continue
        try:
            conv = convert_record(plugins, fmt, src, data, where)
        except RecordError as exc:
            out[j] = ("bad", where, exc.kind, exc.reason)
            continue
        conv.meta["record"] = n
        convs.append(conv)
        slots.append(j)
    for j, conv, enc in zip(slots, convs, encoder.encode(convs), strict=True):
        if isinstance(enc, RecordError):
            out[j] = ("bad", conv.source, enc.kind, enc.reason)
        else:
            out[j] = ("ok", conv.source, conv.meta["record"], conv.plain, *enc)
    return out  # type: ignore[return-value]


class EncodePool:
    """Maps `encode_job` over chunks, with `workers` forked processes or in this process."""

    def __init__(self, plugins: Any, encoder: Encoder, workers: int = 1) -> None:
        _STATE.update(plugins=plugins, encoder=encoder)
        self.workers = workers
        self._pool: Any = None
        if workers > 1:
            ctx = mp.get_context("fork")
            self._pool = ctx.Pool(workers, initializer=_quiet_tokenizers)

    def map(self, jobs: Iterable[Job]) -> Iterator[list[Outcome]]:
        if self._pool is None:
            return map(encode_job, jobs)
        return self._pool.imap(encode_job, jobs)

    def __enter__(self) -> EncodePool:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
        _STATE.clear()


def _quiet_tokenizers() -> None:
    # Each worker tokenizes its own chunk; nested Rust thread pools would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
