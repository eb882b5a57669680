"""Atomic checkpoints (core, no torch): a failed, killed or disk-starved save never costs the
previous checkpoint, and `--resume auto` only ever picks a complete one.

    $ .venvs/core/bin/python -m pytest tests/reliability/test_checkpoints.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sft.checkpoints import (
    MARKER,
    atomic_checkpoint,
    checkpoint_dir,
    complete_checkpoints,
    latest_checkpoint,
    read_meta,
    resolve_resume,
)
from sft.errors import SftError


def save(run: Path, step: int, payload: str = "w", **kw) -> Path:
    with atomic_checkpoint(run, step, {"position": step}, **kw) as tmp:
        (tmp / "weights.bin").write_text(f"{payload}{step}")
    return checkpoint_dir(run, step)


def test_exception_mid_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    save(tmp_path, 1)
    with pytest.raises(RuntimeError), atomic_checkpoint(tmp_path, 2, {}) as tmp:
        (tmp / "weights.bin").write_text("half")
        raise RuntimeError("disk went away")
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 1)
    assert (checkpoint_dir(tmp_path, 1) / "weights.bin").read_text() == "w1"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]


def test_not_enough_disk_is_a_clear_error_before_anything_is_written(tmp_path: Path) -> None:
    save(tmp_path, 1)
    with pytest.raises(SftError, match=r"not enough disk space .* MiB free, about \d+ MiB needed"):
        save(tmp_path, 2, needed_bytes=2**60)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000001"]
    assert not checkpoint_dir(tmp_path, 2).exists()


CRASHER = """
import sys
from pathlib import Path
from sft.checkpoints import atomic_checkpoint
run = Path(sys.argv[1])
for step in (1, 2):
    with atomic_checkpoint(run, step, {}) as tmp:
        (tmp / "weights.bin").write_text(f"w{step}")
        (tmp / "optimizer.bin").write_text(f"o{step}")
"""


def test_sigkill_inside_a_save_leaves_the_last_good_checkpoint(tmp_path: Path) -> None:
    # The real thing: the process dies by SIGKILL inside atomic_checkpoint (fault injection
    # hook), after the step-2 files are written and before its marker.
    env = {**os.environ, "SFT_TEST_CRASH_IN_SAVE": "2"}
    proc = subprocess.run([sys.executable, "-c", CRASHER, str(tmp_path)], env=env)
    assert proc.returncode == -signal.SIGKILL
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left[0].startswith(".tmp-step-000002-") and left[1:] == ["step-000001"], left
    assert (tmp_path / "checkpoints" / left[0] / "weights.bin").read_text() == "w2"
    assert resolve_resume("auto", tmp_path) == checkpoint_dir(tmp_path, 1)
    # resume cleaned the dead process's partial save up
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]


def test_incomplete_torn_and_foreign_directories_are_never_resumed(tmp_path: Path) -> None:
    good = save(tmp_path, 3)
    root = tmp_path / "checkpoints"
    (root / "step-000009").mkdir()  # no marker: a crash before the rename
    (root / "step-000008").mkdir()
    (root / "step-000008" / MARKER).write_text('{"step": 8, "posi')  # torn write
    (root / "step-000007").mkdir()
    (root / "step-000007" / MARKER).write_text(json.dumps({"step": 1}))  # copied from elsewhere
    (root / "step-latest").mkdir()
    (root / "notes.txt").write_text("not a checkpoint")
    assert latest_checkpoint(tmp_path) == good
    assert resolve_resume("auto", tmp_path) == good
    with pytest.raises(SftError, match="not a complete sft checkpoint"):
        resolve_resume(str(root / "step-000009"), tmp_path)
    with pytest.raises(SftError, match="unreadable"):
        read_meta(root / "step-000008")


def test_resaving_a_step_replaces_it_and_pruning_keeps_the_newest(tmp_path: Path) -> None:
    save(tmp_path, 1, payload="old")
    save(tmp_path, 1, payload="new")
    assert (checkpoint_dir(tmp_path, 1) / "weights.bin").read_text() == "new1"
    for step in (2, 3, 4):
        save(tmp_path, step, keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000003",
        "step-000004",
    ]


def test_a_checkpoint_moved_aside_by_a_dead_process_is_put_back(tmp_path: Path) -> None:
    # A process re-saving step 5 died between moving the old step-000005 aside and renaming the
    # new one in: resume must still find step 5.
    save(tmp_path, 5)
    root = tmp_path / "checkpoints"
    dead = _dead_pid()
    os.replace(root / "step-000005", root / f".old-step-000005-{dead}")
    (root / f".tmp-step-000005-{dead}").mkdir()
    assert resolve_resume("auto", tmp_path) == checkpoint_dir(tmp_path, 5)
    assert sorted(p.name for p in root.iterdir()) == ["step-000005"]


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout)


# Mutation testing (`make mutate`, docs/CONTRIBUTING.md) found the behaviours below unchecked.


def test_leftovers_of_live_writers_stay_and_only_a_moved_aside_checkpoint_comes_back(
    tmp_path: Path,
) -> None:
    """Cleanup before a save: a `.tmp-*` of another live process (a concurrent writer) is left
    alone and does not stop the cleanup of the rest; this process's own and dead processes'
    leftovers go; a complete `.old-*` comes back only where its step is missing; a complete
    `.tmp-*` is never promoted (its writer died before committing it)."""
    save(tmp_path, 4)
    root = tmp_path / "checkpoints"
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead, live, me = _dead_pid(), writer.pid, os.getpid()
    complete = {"step": 4}

    def leftover(name: str, step: int | None = None) -> None:
        (root / name).mkdir()
        if step is not None:
            (root / name / MARKER).write_text(json.dumps({"step": step}))

    leftover(f".tmp-step-000001-{live}")  # sorts first: the loop must go on past it
    leftover(f".tmp-step-000002-{me}")
    leftover(f".old-step-000004-{dead}", **complete)  # step-000004 exists: delete
    leftover(f".old-step-000006-{dead}")  # incomplete: delete, never resume it
    leftover(f".tmp-step-000007-{dead}", 7)  # complete but never committed: delete
    leftover(f".old-step-000008-{dead}", 8)  # complete, step 8 missing: put back
    try:
        save(tmp_path, 9)
        assert writer.poll() is None, "checking that the writer is alive must not signal it"
    finally:
        writer.kill()
        writer.wait()
    assert sorted(p.name for p in root.iterdir()) == [
        f".tmp-step-000001-{live}",
        "step-000004",
        "step-000008",
        "step-000009",
    ]
    assert read_meta(root / "step-000004")["position"] == 4  # the real one, not the old copy


def test_latest_checkpoint_of_a_run_without_any_is_none(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    assert latest_checkpoint(tmp_path) is None and resolve_resume("auto", tmp_path) is None


def test_a_marker_that_is_not_an_object_is_a_clear_error(tmp_path: Path) -> None:
    ckpt = save(tmp_path, 1)
    (ckpt / MARKER).write_text("[1, 2]")
    with pytest.raises(SftError, match=rf"checkpoint .*step-000001: {MARKER} is not a JSON obj"):
        read_meta(ckpt)
    (ckpt / MARKER).write_text("{")
    with pytest.raises(SftError, match="resume from another checkpoint or use --resume auto"):
        read_meta(ckpt)


def test_the_disk_space_check_reports_mib_and_creates_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from collections import namedtuple

    from sft import checkpoints

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: usage(0, 0, 300 * 2**20))
    where = tmp_path / "a" / "b"
    checkpoints.check_free_space(where, 300 * 2**20)  # exactly enough is enough
    assert where.is_dir()
    with pytest.raises(SftError, match=r": 300 MiB free, about 512 MiB needed\. Free space"):
        checkpoints.check_free_space(where, 512 * 2**20)
