"""Checkpoint directories: atomic to write, easy to find.

A checkpoint is `RUN/checkpoints/step-000120/` holding whatever the backend saves plus
`sft-checkpoint.json` (step, fingerprint) written last; a directory without it is incomplete
(a crash mid-save) and is never resumed from. Saves go to a hidden temporary directory that is
flushed and renamed into place, so the previous checkpoint always survives.

    with atomic_checkpoint(run_dir, step=120, meta={...}) as tmp:
        save_everything_into(tmp)
    latest_checkpoint(run_dir)    # -> Path(".../checkpoints/step-000120") or None
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sft.errors import SftError

MARKER = "sft-checkpoint.json"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_free_space(path: Path, needed_bytes: int) -> None:
    """Raise a clear error if the filesystem holding `path` has less than `needed_bytes` free."""
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise SftError(
            f"not enough disk space for a checkpoint in {path}: {free / 2**20:.0f} MiB free, "
            f"about {needed_bytes / 2**20:.0f} MiB needed. Free space or lower checkpoint.keep_last"
        )


@contextmanager
def atomic_checkpoint(
    run_dir: Path, step: int, meta: dict[str, Any], keep_last: int | None = None,
    needed_bytes: int = 0,
) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it becomes the step's checkpoint."""
    final = checkpoint_dir(run_dir, step)
    parent = final.parent
    check_free_space(parent, needed_bytes)
    tmp = parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"step": step, **meta}, indent=2))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def read_meta(ckpt: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((Path(ckpt) / MARKER).read_text())
    return data


def resolve_resume(spec: str | None, run_dir: Path) -> Path | None:
    """`auto` -> newest complete checkpoint or None; a path -> that checkpoint (checked)."""
    if spec is None:
        return None
    if spec == "auto":
        return latest_checkpoint(run_dir)
    p = Path(spec).expanduser().resolve()
    if not (p / MARKER).is_file():
        raise SftError(
            f"{p} is not a complete sft checkpoint (no {MARKER}); use --resume auto to pick the "
            f"newest complete one in {run_dir}/checkpoints"
        )
    return p
