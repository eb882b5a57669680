"""Which checkpoint `--resume auto` continues from on the MindSpore backend (`resume_point`),
from the ranks' meta.json files as MindFormers and sft's callback write them. Fast: files only.

    $ .venvs/ms/bin/python -m pytest tests/backends/mindspore/test_resume_point.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("mindspore")

from sft_mindspore.train import resume_point

pytestmark = pytest.mark.mindspore


def save(ckpt_dir: Path, rank: int, name: str, last_step: int, global_step: int | None) -> None:
    """A rank's checkpoint file and its meta.json (`sft_global_step` from sft's callback)."""
    d = ckpt_dir / f"rank_{rank}"
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(b"ckpt")
    meta = {"last_epoch": 1, "last_step": last_step, "last_ckpt_file": name}
    if global_step is not None:
        meta["sft_global_step"] = global_step
    (d / "meta.json").write_text(json.dumps(meta))


def test_a_resumed_launch_is_resumed_at_its_global_step(tmp_path: Path) -> None:
    # launch 1 saved step 4; launch 2 (resumed from 4) saved its 4th step = global step 8, which
    # MindFormers names and records as step 4 of that launch
    for rank in (0, 1):
        save(tmp_path, rank, f"sft_rank_{rank}-1_4.ckpt", 4, 4)
        save(tmp_path, rank, f"sft_rank_{rank}_1-1_4.ckpt", 4, 8)
    assert resume_point(tmp_path) == (8, tmp_path / "rank_0" / "sft_rank_0_1-1_4.ckpt")


def test_ranks_killed_between_their_saves_resume_at_the_step_all_have(tmp_path: Path) -> None:
    # rank 0 saved global step 8 in launch 2, rank 1 was killed before it: step 4, both have it
    for rank in (0, 1):
        save(tmp_path, rank, f"sft_rank_{rank}-1_4.ckpt", 4, 4)
    save(tmp_path, 0, "sft_rank_0_1-1_4.ckpt", 4, 8)
    assert resume_point(tmp_path) == (4, tmp_path / "rank_0" / "sft_rank_0-1_4.ckpt")


def test_meta_without_sfts_step_falls_back_to_mindformers_last_step(tmp_path: Path) -> None:
    for rank in (0, 1):
        save(tmp_path, rank, f"sft_rank_{rank}-1_6.ckpt", 6, None)
    assert resume_point(tmp_path) == (6, tmp_path / "rank_0" / "sft_rank_0-1_6.ckpt")
