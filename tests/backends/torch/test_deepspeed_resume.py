"""DeepSpeed ZeRO-2 / ZeRO-3 runs write resumable checkpoints and resume exactly (issue #20,
item 5), on CPU with DeepSpeed's CPU accelerator and gloo.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_deepspeed_resume.py

Per stage, two launches of 2 processes (the job of test_distributed.py: tiny llama, full
fine-tuning, 4 steps): one uninterrupted run that checkpoints every 2 steps, then a run resumed
from its step-2 checkpoint, which must end on the same weights and log the same losses for
steps 3-4. Before, `checkpoint.every_steps` / `resume` with zero2 / zero3 was refused at
validation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from safetensors.torch import load_file  # noqa: E402
from sft.errors import SftError  # noqa: E402
from sft.events import read_metrics  # noqa: E402

from tests.backends.torch.test_distributed import job, sft_run  # noqa: E402, F401

pytestmark = [pytest.mark.torch, pytest.mark.slow]


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_zero_resume_equals_uninterrupted(job: Path, strategy: str) -> None:  # noqa: F811
    two = ("parallel.nproc_per_node=2", f"parallel.strategy={strategy}")
    full = job.parent / f"{strategy}-full"
    sft_run(job, full, *two, "checkpoint.every_steps=2")
    ckpt = full / "checkpoints" / "step-000002"
    meta = json.loads((ckpt / "sft-checkpoint.json").read_text())
    assert meta["parallel"] == {"strategy": strategy, "world_size": 2, "format": "deepspeed"}
    # DeepSpeed's own files: every rank's optimizer partition
    parts = sorted(p.name for p in (ckpt / "deepspeed" / "state").iterdir())
    assert sum("optim_states" in p for p in parts) == 2, parts

    resumed = job.parent / f"{strategy}-resumed"
    summary = sft_run(job, resumed, *two, f"checkpoint.resume={ckpt}")
    assert summary["metrics"]["resumed_at_step"] == 2
    mine = load_file(str(resumed / "final" / "model.safetensors"))
    ref = load_file(str(full / "final" / "model.safetensors"))
    assert sorted(mine) == sorted(ref)
    worst = max(float((mine[k].float() - ref[k].float()).abs().max()) for k in ref)
    assert worst < 1e-6, f"resumed final weights differ by {worst}"
    a = [r["loss"] for r in read_metrics(resumed) if "loss" in r]
    b = [r["loss"] for r in read_metrics(full) if "loss" in r][2:]
    assert a == pytest.approx(b, rel=1e-6) and len(a) == 2


def test_a_zero_checkpoint_resumes_only_with_its_strategy_and_world_size() -> None:
    from sft_torch.deepspeed import DeepSpeedEngine
    from sft_torch.distributed import Engine

    model = torch.nn.Linear(2, 2)
    saved = {"strategy": "zero3", "world_size": 2, "format": "deepspeed"}
    with pytest.raises(SftError, match=r"resume it with parallel\.strategy=zero3 on 2 processes"):
        Engine(model).check_resume(saved, "ckpt")
    zero2 = DeepSpeedEngine(model, {"zero_optimization": {"stage": 2}}, "zero2")
    with pytest.raises(SftError, match="written by strategy zero3 on 2 processes"):
        zero2.check_resume(saved, "ckpt")
    with pytest.raises(SftError, match="written by strategy ddp"):
        zero2.check_resume({"strategy": "ddp", "world_size": 1, "format": "whole"}, "ckpt")
