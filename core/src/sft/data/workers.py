"""Records -> (ids, labels) in chunks, in this process or in worker processes.

Rendering chat templates is Python (Jinja) and dominates preparation next to tokenization, so
large datasets are spread over processes: chunks of raw records go out in order, outcomes come
back in order (at most AHEAD chunks per worker in flight), and the parent does the accounting, so counts, rejects and sample order
are identical to a single-process run.

    with EncodePool(plugins, encoder, workers=4) as pool:
        for outcomes in pool.map(jobs):     # jobs: (format, DataSource, [(n, where, data, ...)])
            ...                             # ("ok", where, n, plain, ids, labels) | ("bad", where, kind, reason)

Workers: `SFT_DATA_WORKERS` if set, else one per CPU but one (at most 8, at least 2) for inputs
over 1 MiB, else none.

Workers are *spawned*, not forked: the parent is often multi-threaded by then (torch's thread
pools, a tokenizer's Rust pool, tqdm's monitor, a logger's writer thread), and a child forked
from a multi-threaded process can deadlock on a lock another thread held at the fork. A spawned
worker
rebuilds its encoder from a small picklable recipe (`init`: a module-level function and its
arguments), so it never inherits such state. As with any spawn-based pool, a script that calls
sft's Python API at import time needs the usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from sft.data.conversation import RecordError
from sft.data.encoder import Encoder
from sft.data.formats import convert_record
from sft.data.sources import RawRecord

# (format, DataSource, [(record number, where, data, (kind, reason) of a bad record, JSON line)])
Chunk = list[tuple[int, str, dict[str, Any] | None, tuple[str, str] | None, str | None]]
Job = tuple[str | None, Any, Chunk]
Outcome = tuple[Any, ...]

AHEAD = 2  # chunks per worker submitted ahead of the one the parent waits for

# This process's plugins and encoder: set by EncodePool in the parent, by _init_worker in a worker.
_STATE: dict[str, Any] = {}

Init = tuple[Callable[..., tuple[Any, Encoder]], tuple[Any, ...]]
"""(function, args): `function(*args)` returns (plugins, encoder) in a fresh worker process."""


def default_workers(files: list[Path]) -> int:
    env = os.environ.get("SFT_DATA_WORKERS")
    if env:
        return max(1, int(env))
    # The parent reads, parses and accounts: it keeps a core, workers get the others.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min((cpus or 1) - 1, 8)
    size = sum(f.stat().st_size for f in files if f.is_file())
    return workers if workers >= 2 and size > (1 << 20) else 1


def encode_job(job: Job) -> list[Outcome]:
    """Convert and encode one chunk of raw records; outcomes in record order."""
    fmt, src, chunk = job
    if "init_error" in _STATE:  # raised here, so the parent's imap re-raises it
        raise RuntimeError(f"data worker could not start: {_STATE['init_error']}")
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
    """Maps `encode_job` over chunks, with `workers` spawned processes or in this process.
    `init` rebuilds the encoder in each worker; without it everything runs here."""

    def __init__(
        self, plugins: Any, encoder: Encoder, workers: int = 1, init: Init | None = None
    ) -> None:
        _STATE.update(plugins=plugins, encoder=encoder)
        self._pool: Any = None
        self._ahead = AHEAD * workers
        if init is not None and workers > 1:
            ctx = mp.get_context("spawn")
            self._pool = ctx.Pool(workers, initializer=_init_worker, initargs=init)

    def map(self, jobs: Iterable[Job]) -> Iterator[list[Outcome]]:
        if self._pool is None:
            return map(encode_job, jobs)
        return self._in_order(jobs)

    def _in_order(self, jobs: Iterable[Job]) -> Iterator[list[Outcome]]:
        # Not Pool.imap: its feeder thread reads `jobs` to the end at once, so the whole input
        # would sit in the task queue. At most AHEAD chunks per worker are out at a time.
        window: deque[Any] = deque()
        for job in jobs:
            window.append(self._pool.apply_async(encode_job, (job,)))
            if len(window) >= self._ahead:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()

    def __enter__(self) -> EncodePool:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
        _STATE.clear()


def _init_worker(build: Callable[..., tuple[Any, Encoder]], args: tuple[Any, ...]) -> None:
    # Each worker tokenizes its own chunk; nested Rust thread pools would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        plugins, encoder = build(*args)
    except Exception as exc:  # a failing Pool initializer would be respawned forever
        _STATE["init_error"] = f"{type(exc).__name__}: {exc}"
        return
    _STATE.update(plugins=plugins, encoder=encoder)
