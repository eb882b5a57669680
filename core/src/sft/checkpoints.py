"""Checkpoint directories: atomic to write, easy to find. The layer every backend shares; what
goes inside a directory is the backend's (the torch backend's: `sft_torch.checkpoints`).

A checkpoint is `RUN/checkpoints/step-000120/` holding whatever the backend saves plus
`sft-checkpoint.json` (step, fingerprint) written last; a directory without it is incomplete
(a crash mid-save) and is never resumed from. Saves go to a hidden temporary directory that is
flushed and renamed into place, so the previous checkpoint always survives.

    with atomic_checkpoint(run_dir, step=120, meta={...}) as tmp:
        save_everything_into(tmp)
    latest_checkpoint(run_dir)    # -> Path(".../checkpoints/step-000120") or None

Crash safety (tests/reliability): the marker is written and fsynced inside the temporary
directory before the rename, an existing directory of the same step is moved aside (not deleted)
before the rename, and pruning old checkpoints removes their marker first, so at every instant
each `step-*` directory with a marker is complete. What a dead process left behind is cleaned
up by the next save or resume: `.tmp-*` directories are deleted, a moved-aside `.old-*`
checkpoint whose replacement never arrived is renamed back.

Test hook: `SFT_TEST_CRASH_IN_SAVE=120` SIGKILLs the process inside the save of step 120, after
the backend's files are written and before the marker (simulating a kill mid-save). Not for users.

    $ .venvs/core/bin/python -m pytest tests/reliability/test_checkpoints.py    # its tests
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sft.errors import SftError
from sft.rundir import checkpoints_dir

MARKER = "sft-checkpoint.json"
CRASH_ENV = "SFT_TEST_CRASH_IN_SAVE"
_STEP_DIR = re.compile(r"step-(\d+)")
_TMP_DIR = re.compile(r"\.(?:tmp|old)-step-(\d+)-(\d+)")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step:06d}"


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
    run_dir: Path,
    step: int,
    meta: dict[str, Any],
    keep_last: int | None = None,
    needed_bytes: int = 0,
) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it becomes the step's checkpoint."""
    final = checkpoint_dir(run_dir, step)
    parent = final.parent
    check_free_space(parent, needed_bytes)
    recover_interrupted(parent)
    tmp = parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _crash_hook(step)
        (tmp / MARKER).write_text(json.dumps({"step": step, **meta}, indent=2))
        _fsync_tree(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            remove_checkpoint(old)


def _crash_hook(step: int) -> None:
    # Fault injection for tests/reliability: die exactly like `kill -9` would, mid-save.
    if os.environ.get(CRASH_ENV, "").strip() == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`. A complete `final` (the same step saved again) is first moved
    aside and deleted only after the rename, so a crash in between still leaves one of them."""
    aside = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)


def remove_checkpoint(ckpt: Path) -> None:
    """Delete a checkpoint marker first: an interrupted delete leaves an incomplete directory
    (ignored by resume), never a "complete" one with missing files."""
    (Path(ckpt) / MARKER).unlink(missing_ok=True)
    shutil.rmtree(ckpt, ignore_errors=True)


def recover_interrupted(parent: Path) -> None:
    """Clean up after processes that died mid-save: delete their `.tmp-*` directories; put a
    moved-aside complete `.old-step-N-*` back when `step-N` never arrived, else delete it."""
    if not parent.is_dir():
        return
    for p in sorted(parent.iterdir()):
        m = _TMP_DIR.fullmatch(p.name)
        if not (m and p.is_dir()) or _alive(int(m.group(2))):
            continue
        final = parent / f"step-{m.group(1)}"
        if p.name.startswith(".old-") and not final.exists() and _complete(p, int(m.group(1))):
            os.replace(p, final)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers (an earlier failed save of this process)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and _complete(p, int(m.group(1))):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _complete(ckpt: Path, step: int) -> bool:
    """A marker that parses and names this directory's step (a torn or foreign marker does
    not count)."""
    try:
        meta = json.loads((ckpt / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("step") == step


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(ckpt) / MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise SftError(
            f"checkpoint {ckpt}: unreadable {MARKER} ({exc}); resume from another "
            "checkpoint or use --resume auto"
        ) from None
    if not isinstance(data, dict):
        raise SftError(f"checkpoint {ckpt}: {MARKER} is not a JSON object")
    return data


def resolve_resume(spec: str | None, run_dir: Path) -> Path | None:
    """`auto` -> newest complete checkpoint or None; a path -> that checkpoint (checked)."""
    if spec is None:
        return None
    if spec == "auto":
        recover_interrupted(checkpoints_dir(run_dir))
        return latest_checkpoint(run_dir)
    p = Path(spec).expanduser().resolve()
    if not (p.is_dir() and (p / MARKER).is_file()):
        raise SftError(
            f"{p} is not a complete sft checkpoint (no {MARKER}); use --resume auto to pick the "
            f"newest complete one in {run_dir}/checkpoints"
        )
    return p
