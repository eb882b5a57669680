"""What each fine-tuning method trains, on tiny random llama / qwen2 models (fp32, CPU).

$ .venvs/torch/bin/python -m pytest tests/backends/torch/test_train_methods.py
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from sft.data.schedule import Position
from sft.events import read_metrics
from sft_torch.train import Trainer, fit

from tests.backends.torch.conftest import events_for, make_plan

pytestmark = pytest.mark.torch


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def trained(tmp_path, model_dir, **kw):
    plan = make_plan(tmp_path, model_dir, **kw)
    trainer = Trainer(plan, events_for(plan))
    before = snapshot(trainer.model)
    result = fit(trainer)
    return plan, trainer, before, result


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
def test_loss_decreases_and_run_dir_is_complete(arch, tmp_path, request):
    model_dir = request.getfixturevalue(arch)
    plan, _, _, result = trained(
        tmp_path,
        model_dir,
        method="full",
        n=8,
        eval_n=4,
        train={
            "max_steps": 12,
            "learning_rate": 3e-3,
            "lr_scheduler": "constant",
            "micro_batch_size": 4,
            "gradient_accumulation_steps": 2,
        },
        logging={"plot": True},
    )
    train_rows = [r for r in read_metrics(plan.run_dir) if "loss" in r]
    assert len(train_rows) == 12
    first, last = train_rows[0]["loss"], train_rows[-1]["loss"]
    assert last < first - 0.5, (first, last)
    for key in ("lr", "grad_norm", "tokens_per_s", "trained_tokens"):
        assert key in train_rows[-1]
    assert result.metrics["eval_loss"] > 0 and result.metrics["tokens_per_s"] > 0
    assert result.metrics["trained_tokens"] == train_rows[-1]["trained_tokens"]
    # loss.png is drawn by core after any backend's training (sft.run; test_sft_run checks it)
    from sft.plot import plot_loss

    assert plot_loss(plan.run_dir).stat().st_size > 1000


def test_lora_freezes_base_and_trains_every_adapter_weight(tmp_path, tiny_qwen2):
    _, trainer, before, result = trained(
        tmp_path,
        tiny_qwen2,
        method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        train={"max_steps": 4},
    )
    after = snapshot(trainer.model)
    lora = [n for n in after if "lora_" in n]
    base = [n for n in after if "lora_" not in n]
    assert len(lora) == 2 * 7 * 2  # A and B, 7 linear layers (all-linear), 2 decoder layers
    assert all(not torch.equal(before[n], after[n]) for n in lora)
    assert all(torch.equal(before[n], after[n]) for n in base)
    # the frozen base equals the weights on disk, bit for bit
    disk = load_file(str(tiny_qwen2 / "model.safetensors"))
    for n in base:
        key = n.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(after[n], disk[key]), n
    adapter = load_file(result.outputs["adapter"] + "/adapter_model.safetensors")
    assert len(adapter) == len(lora)


def test_full_trains_every_parameter(tmp_path, tiny_llama):
    _, trainer, before, result = trained(
        tmp_path, tiny_llama, method="full", train={"max_steps": 3}
    )
    after = snapshot(trainer.model)
    assert all(not torch.equal(before[n], after[n]) for n in after)
    assert "model" in result.outputs


def test_freeze_trains_only_the_chosen_layers(tmp_path, tiny_llama):
    method = {"name": "freeze", "trainable_layers": 1, "trainable_modules": ["lm_head"]}
    _, trainer, before, _ = trained(tmp_path, tiny_llama, method=method, train={"max_steps": 3})
    after = snapshot(trainer.model)
    changed = {n for n in after if not torch.equal(before[n], after[n])}
    chosen = {n for n in after if n.startswith("model.layers.1.") or n.startswith("lm_head")}
    assert changed == chosen
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == chosen  # the rest is skipped in backward, not just left unstepped


def test_freeze_pattern_that_matches_nothing_is_a_clear_error(tmp_path, tiny_llama):
    from sft.errors import SftError

    plan = make_plan(
        tmp_path,
        tiny_llama,
        method={"name": "freeze", "trainable_layers": 0, "trainable_modules": ["no_such_module"]},
    )
    with pytest.raises(SftError, match=r"no_such_module.*match no parameter"):
        Trainer(plan, events_for(plan))


def test_dora_rslora_and_modules_to_save(tmp_path, tiny_llama):
    method = {
        "name": "lora",
        "r": 4,
        "use_dora": True,
        "use_rslora": True,
        "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": ["lm_head"],
    }
    _, trainer, before, result = trained(
        tmp_path, tiny_llama, method=method, train={"max_steps": 2}
    )
    after = snapshot(trainer.model)
    changed = {n for n in after if not torch.equal(before[n], after[n])}
    assert any("lora_magnitude_vector" in n for n in changed)
    assert any("modules_to_save" in n and "lm_head" in n for n in changed)
    assert not any("k_proj" in n for n in changed)
    cfg = json.loads(open(result.outputs["adapter"] + "/adapter_config.json").read())
    assert cfg["use_dora"] and cfg["use_rslora"] and cfg["modules_to_save"] == ["lm_head"]


def test_nan_policy_stop_names_the_step_and_skip_leaves_weights(tmp_path, tiny_llama, monkeypatch):
    from sft.guard import Diverged

    monkeypatch.setenv("SFT_TEST_INJECT_NAN_STEP", "2")
    plan = make_plan(tmp_path / "stop", tiny_llama, train={"max_steps": 3})
    with pytest.raises(Diverged, match="at step 2"):
        fit(Trainer(plan, events_for(plan)))
    tr = {"lr_scheduler": "constant", "nan_policy": "skip"}
    plan = make_plan(tmp_path / "skip", tiny_llama, method="full", train={**tr, "max_steps": 3})
    trainer = Trainer(plan, events_for(plan))
    result = fit(trainer)
    assert result.metrics["skipped_steps"] == [2]
    logged = [r for r in read_metrics(plan.run_dir) if "loss" in r]
    assert all(math.isfinite(r["loss"]) for r in logged) and logged[-1]["skipped_steps"] == 1
    skipped = snapshot(trainer.model)
    monkeypatch.delenv("SFT_TEST_INJECT_NAN_STEP")
    # The same run without step 2: step 1, then step 3's rows (its data position is kept)
    plan = make_plan(tmp_path / "ref", tiny_llama, method="full", train={**tr, "max_steps": 3})
    ref = Trainer(plan, events_for(plan))
    rows = [r for _, r in ref.schedule.steps(Position())]
    for k in (0, 2):
        ref.train_step(Position(0, k, k), rows[k])
    assert all(torch.equal(skipped[n], p) for n, p in ref.model.named_parameters())


def test_freeze_pattern_matches_a_tied_head(tmp_path, tiny_llama):
    """SmolLM2 ties lm_head to the embeddings: `trainable_modules: [lm_head]` must still match
    (transformers lists the shared tensor once, under the embedding's name)."""
    import shutil

    tied = tmp_path / "tied"
    shutil.copytree(tiny_llama, tied)
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    weights = load_file(str(tied / "model.safetensors"))
    del weights["lm_head.weight"]  # a tied checkpoint stores the shared tensor once
    save_file(weights, str(tied / "model.safetensors"), metadata={"format": "pt"})
    method = {"name": "freeze", "trainable_layers": 0, "trainable_modules": ["lm_head"]}
    plan = make_plan(tmp_path, tied, method=method)
    trainer = Trainer(plan, events_for(plan))
    lm = trainer.model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable == {"model.embed_tokens.weight"}
