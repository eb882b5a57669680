"""Checkpoints and resume: a run resumed from a checkpoint continues exactly (fp32, CPU):
same per-step losses, bitwise-equal final weights; a changed data order is refused.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_resume.py
"""

from __future__ import annotations

import pytest
import torch
from sft.checkpoints import complete_checkpoints, read_meta
from sft.errors import SftError
from sft.events import read_metrics
from sft_torch.train import Trainer, fit

from tests.backends.torch.conftest import events_for, make_plan

pytestmark = pytest.mark.torch

# 10 samples, 4 rows per step: 3 steps per epoch, so resuming at step 4 lands mid-epoch 1
COMMON = {"n": 10, "data": {"shuffle": True}}
TRAIN = {"max_steps": 7, "learning_rate": 5e-3, "warmup_steps": 2}


def run(plan):
    trainer = Trainer(plan, events_for(plan))
    result = fit(trainer)
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    losses = {r["step"]: r["loss"] for r in read_metrics(plan.run_dir) if "loss" in r}
    return result, weights, losses


@pytest.mark.parametrize("method", [{"name": "lora", "dropout": 0.2}, "full"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, tiny_llama, method):
    ck = {"every_steps": 2, "keep_last": 10}
    plan = make_plan(
        tmp_path / "a", tiny_llama, method=method, train=TRAIN, checkpoint=ck, **COMMON
    )
    _, full_w, full_losses = run(plan)
    ckpts = complete_checkpoints(plan.run_dir)
    assert [p.name for p in ckpts] == ["step-000002", "step-000004", "step-000006", "step-000007"]
    mid = ckpts[1]
    assert read_meta(mid)["position"] == {"epoch": 1, "step_in_epoch": 1, "global_step": 4}

    resumed = make_plan(
        tmp_path / "b",
        tiny_llama,
        method=method,
        train=TRAIN,
        checkpoint=ck,
        resume_from=mid,
        **COMMON,
    )
    result, res_w, res_losses = run(resumed)
    assert result.metrics["resumed_at_step"] == 4 and result.steps == 7
    assert sorted(res_losses) == [5, 6, 7]
    assert all(res_losses[s] == full_losses[s] for s in res_losses)
    assert all(torch.equal(full_w[n], res_w[n]) for n in full_w)


def test_checkpoints_keep_last(tmp_path, tiny_llama):
    plan = make_plan(
        tmp_path, tiny_llama, train={"max_steps": 5}, checkpoint={"every_steps": 1, "keep_last": 2}
    )
    run(plan)
    assert [p.name for p in complete_checkpoints(plan.run_dir)] == ["step-000004", "step-000005"]


def test_resume_refuses_a_changed_data_order(tmp_path, tiny_llama):
    ck = {"every_steps": 2}
    plan = make_plan(tmp_path / "a", tiny_llama, train={"max_steps": 2}, checkpoint=ck)
    run(plan)
    ckpt = complete_checkpoints(plan.run_dir)[-1]
    changed = make_plan(
        tmp_path / "b",
        tiny_llama,
        checkpoint=ck,
        resume_from=ckpt,
        data={"max_seq_len": 32},
        train={"max_steps": 4, "micro_batch_size": 1},
    )
    with pytest.raises(SftError) as err:
        run(changed)
    assert "max_seq_len: 64 -> 32" in str(err.value)
    assert "global_batch: 4 -> 2" in str(err.value)
    assert "allow_changed" in str(err.value)
    allowed = make_plan(
        tmp_path / "c",
        tiny_llama,
        resume_from=ckpt,
        data={"max_seq_len": 32},
        train={"max_steps": 4, "micro_batch_size": 1},
        checkpoint={**ck, "allow_changed": True},
    )
    result, _, _ = run(allowed)
    assert result.metrics["resumed_at_step"] == 2
