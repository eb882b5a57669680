"""fp16 training with loss scaling (issue #20, item 7), run for real on CPU: torch's GradScaler
and fp16 autocast both work on CPU, so the skip / LR-schedule / checkpoint logic of the loop is
exercised with real overflows. Users still get fp16 only on CUDA (validation refuses it on
CPU); these tests set the resolved precision directly.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_fp16.py -q
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from sft.checkpoints import complete_checkpoints
from sft.events import read_metrics
from sft.guard import Diverged
from sft_torch import runtime
from sft_torch import train as train_mod

from tests.backends.torch.conftest import events_for, make_plan

pytestmark = pytest.mark.torch

#: so large that the first steps' fp16 activation gradients overflow (the logits' gradients
#: are about scale / trained tokens, fp16 ends at 65504): the scaler halves it on each of those
#: steps and skips them
HUGE_SCALE = 2.0**24
TRAIN = {
    "max_steps": 14,
    "learning_rate": 5e-3,
    "warmup_steps": 0,
    "lr_scheduler": "linear",
    "max_consecutive_skips": 20,
}


@pytest.fixture
def fp16_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "resolve_precision", lambda *a, **k: "fp16")
    monkeypatch.setattr(train_mod, "INIT_LOSS_SCALE", HUGE_SCALE)


def run(plan: Any) -> tuple[Any, Any]:
    trainer = train_mod.Trainer(plan, events_for(plan))
    return trainer, train_mod.fit(trainer)


def test_overflow_skips_are_counted_and_do_not_advance_the_schedule(
    fp16_on_cpu: None, tmp_path: Path, tiny_llama: Path
) -> None:
    plan = make_plan(tmp_path, tiny_llama, method="full", train=TRAIN)
    trainer, result = run(plan)
    assert trainer.scaler.is_enabled() and trainer.precision == "fp16"
    skipped = result.metrics["skipped_steps"]
    assert skipped[:3] == [1, 2, 3] and len(skipped) < 14, skipped  # the scale settling
    assert trainer.scaler.get_scale() == HUGE_SCALE / 2 ** len(skipped)
    # the LR schedule advanced once per applied update, not once per step
    applied = 14 - len(skipped)
    assert trainer.scheduler.last_epoch == applied
    assert trainer.optimizer.state[trainer.trainable[0]]["step"] == applied


def test_overflowing_at_every_scale_stops_the_run(
    fp16_on_cpu: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_llama: Path
) -> None:
    """More than max_consecutive_skips overflows in a row: the run has diverged."""
    monkeypatch.setattr(train_mod, "INIT_LOSS_SCALE", 2.0**40)
    plan = make_plan(
        tmp_path, tiny_llama, method="full", train={**TRAIN, "max_consecutive_skips": 3}
    )
    with pytest.raises(Diverged, match="4 fp16 steps in a row overflowed"):
        run(plan)


def test_fp16_weights_train_with_fp32_masters(
    fp16_on_cpu: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_llama: Path
) -> None:
    """model.dtype: float16 with freeze (or LoRA modules_to_save): the trained parameters are
    upcast to fp32 master weights, so the grad scaler can unscale their gradients (with fp16
    parameters the first step failed: "Attempting to unscale FP16 gradients")."""
    monkeypatch.setattr(train_mod, "INIT_LOSS_SCALE", 2.0**8)
    method = {"name": "freeze", "trainable_layers": 1}
    plan = make_plan(
        tmp_path, tiny_llama, method=method, model={"dtype": "float16"}, train={"max_steps": 2}
    )
    trainer, result = run(plan)
    dtypes = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    assert dtypes == {torch.float32} and frozen == {torch.float16}
    assert result.final_loss is not None and result.metrics["skipped_steps"] == []


def test_resume_restores_the_loss_scale(
    fp16_on_cpu: None, tmp_path: Path, tiny_llama: Path
) -> None:
    """A resumed fp16 run continues with the saved loss scale: same skips, bitwise-equal
    weights. (Without scaler.pt it restarted at the initial scale and skipped again.)"""
    ck = {"every_steps": 8, "keep_last": 5}
    plan = make_plan(tmp_path / "a", tiny_llama, method="full", train=TRAIN, checkpoint=ck)
    full, full_result = run(plan)
    ckpt = complete_checkpoints(plan.run_dir)[0]
    assert ckpt.name == "step-000008" and (ckpt / "scaler.pt").is_file()
    resumed_plan = make_plan(
        tmp_path / "b", tiny_llama, method="full", train=TRAIN, checkpoint=ck, resume_from=ckpt
    )
    resumed, result = run(resumed_plan)
    after = [s for s in full_result.metrics["skipped_steps"] if s > 8]
    assert result.metrics["skipped_steps"] == after  # no new settling from the initial scale
    assert resumed.scaler.get_scale() == full.scaler.get_scale()
    for (n, a), (_, b) in zip(
        full.model.named_parameters(), resumed.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), n


def assert_fp16_tracks_fp32(tmp_path: Path, model_dir: Path, device: str) -> None:
    """LoRA trained 4 steps in fp16 with loss scaling logs the same loss and (unscaled) gradient
    norm at every step as the same run in fp32, within fp16's rounding, and no step is skipped:
    a scaler whose factor leaks into the gradients (not unscaled before clipping, or unscaled
    twice) or an autocast that does not run in fp16 shows here, not only a NaN.
    Also called by tests/backends/torch/test_gpu.py on CUDA."""
    train = {"max_steps": 4, "learning_rate": 5e-3, "warmup_steps": 0}
    runs = {}
    for precision in ("fp32", "fp16"):
        plan = make_plan(
            tmp_path / precision,
            model_dir,
            method="lora",
            train={**train, "precision": precision},
            torch_opts={"device": device},
        )
        trainer, result = run(plan)
        assert trainer.precision == precision and result.metrics["skipped_steps"] == []
        runs[precision] = [r for r in read_metrics(plan.run_dir) if "loss" in r]
        if precision == "fp16":
            assert trainer.scaler.is_enabled()
            assert trainer.scaler.get_scale() == train_mod.INIT_LOSS_SCALE  # nothing overflowed
    fp32, fp16 = runs["fp32"], runs["fp16"]
    assert len(fp32) == len(fp16) == 4
    for a, b in zip(fp16, fp32, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-2), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=5e-2), (
            a["step"],
            a["grad_norm"],
            b["grad_norm"],
        )
    assert fp16[-1]["loss"] < fp16[0]["loss"]  # and it trained


def test_fp16_with_loss_scaling_tracks_fp32(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_llama: Path
) -> None:
    """The CPU twin of test_gpu.py's fp16 test (fp16 autocast and GradScaler work on CPU; the
    initial scale is the real one, 2**16, which the tiny model never overflows)."""
    real = runtime.resolve_precision
    monkeypatch.setattr(
        runtime,
        "resolve_precision",
        lambda precision, *a, **k: "fp16" if precision == "fp16" else real(precision, *a, **k),
    )
    assert_fp16_tracks_fp32(tmp_path, tiny_llama, "cpu")
