"""`method.init_adapter` continues an existing PEFT adapter (its loss at step 0 is the adapter's
loss, not the base model's), and `train.optimizer` builds the optimizer it names.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_init_adapter_optim.py -q
"""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from sft.config import load_config
from sft.errors import ConfigError
from sft.events import read_metrics
from sft.run import run
from sft.specs import TrainSpec

from tests.backends.torch.test_sft_run import write_job

pytestmark = pytest.mark.torch


def _job(tmp_path, model, name, **method):
    path = write_job(tmp_path, model)
    job = yaml.safe_load(path.read_text())
    job["data"].pop("eval_fraction")
    job.pop("checkpoint")
    job.pop("eval")
    job["method"] = {"name": "lora", "r": 4, "dropout": 0.0, **method}
    job["train"].update(max_steps=2, learning_rate=5e-2)
    job["output_dir"] = str(tmp_path / name)
    out = tmp_path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(job))
    return out


def _first_loss(run_dir) -> float:
    return next(r["loss"] for r in read_metrics(run_dir) if "loss" in r)


@pytest.mark.slow
def test_lora_continues_from_an_adapter(tmp_path, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run(load_config(_job(tmp_path, tiny_llama, "a")))  # the adapter to continue
    adapter = tmp_path / "a" / "final" / "adapter"
    run(load_config(_job(tmp_path, tiny_llama, "b", init_adapter=str(adapter))))
    # The adapter's function, as plain weights: its merged model under fresh LoRA (B = 0)
    merged = tmp_path / "merged"
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(merged)
    for f in tiny_llama.iterdir():
        if not (merged / f.name).exists():  # the tokenizer and its chat template
            shutil.copy(f, merged / f.name)
    run(load_config(_job(tmp_path, merged, "c")))

    base_loss, continued, adapters_loss = (_first_loss(tmp_path / n) for n in "abc")
    assert continued == pytest.approx(adapters_loss, rel=1e-4)  # step 0 = the adapter's loss
    assert abs(continued - base_loss) > 1e-2  # and not the base model's
    from safetensors.torch import load_file

    a = load_file(adapter / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # it trained


def test_init_adapter_must_agree_with_the_lora_fields_given(tmp_path, tiny_llama):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}'
    )
    job = _job(
        tmp_path, tiny_llama, "x", init_adapter="adapter", target_modules=["v_proj", "q_proj"]
    )
    with pytest.raises(ConfigError) as err:
        load_config(job)  # r: 4 given, the adapter has 8; target_modules agree (any order)
    assert [str(p) for p in err.value.problems] == [
        "method.r: is 4 but method.init_adapter was trained with 8 (remove method.r: the "
        "adapter's own value is used)"
    ]
    with pytest.raises(ConfigError, match=r"method\.init_adapter: .* is not a PEFT adapter"):
        load_config(_job(tmp_path, tiny_llama, "y", init_adapter="nowhere"))
    # a run directory (or its final/) given instead of its final/adapter: the error names it
    (tmp_path / "lora-run" / "final").mkdir(parents=True)
    adapter.rename(tmp_path / "lora-run" / "final" / "adapter")
    for given in ("lora-run", "lora-run/final"):
        with pytest.raises(ConfigError, match=r"its adapter is in .*lora-run/final/adapter"):
            load_config(_job(tmp_path, tiny_llama, "z", init_adapter=given))


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_bitsandbytes_optimizers_are_refused_without_cuda(tmp_path, tiny_llama, name):
    job = _job(tmp_path, tiny_llama, "z")
    with pytest.raises(ConfigError) as err:
        load_config(job, [f"train.optimizer={name}", "torch.device=cpu"])
    [problem] = err.value.problems
    assert problem.path == "train.optimizer" and name in problem.message


def _step(
    name: str, grad: torch.Tensor | None = None, **train
) -> tuple[torch.Tensor, torch.Tensor, torch.optim.Optimizer]:
    """One optimizer step on a 2x3 weight (decayed group) with gradient `grad` (default all
    ones) -> (weight before, weight after, optimizer)."""
    from sft_torch.optim import build_optimizer

    model = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.arange(6.0).reshape(2, 3))
    before = model.weight.detach().clone()
    opt = build_optimizer(model, TrainSpec(optimizer=name, learning_rate=0.1, **train))
    model.weight.grad = torch.ones_like(model.weight) if grad is None else grad
    opt.step()
    return before, model.weight.detach().clone(), opt


def test_each_optimizer_is_the_one_named():
    from transformers.optimization import Adafactor

    before, after, opt = _step("sgd", betas=(0.5, 0.999))
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.5
    assert torch.allclose(after, before - 0.1)  # plain first SGD step: w - lr * g
    before, after, opt = _step("adamw")
    assert type(opt) is torch.optim.AdamW
    assert torch.allclose(after, before - 0.1, atol=1e-6)  # Adam's first step: lr * sign(g)
    grad = torch.tensor([[1.0, 4.0, 0.5], [2.0, 1.0, 3.0]])
    before, after, opt = _step("adafactor", grad)
    assert type(opt) is Adafactor and not opt.defaults["relative_step"]
    assert opt.param_groups[0]["lr"] == 0.1 and not torch.allclose(after, before)
    # Adafactor's factored second moment (row and column means) scales each element unlike
    # Adam, whose first step is lr * sign(g) whatever g
    _, adam_after, _ = _step("adamw", grad)
    assert not torch.allclose(after, adam_after, atol=1e-3)


def test_optimizer_parameters_it_does_not_have_are_refused(tmp_path, tiny_llama):
    job = _job(tmp_path, tiny_llama, "w")
    with pytest.raises(ConfigError, match=r"train: .*eps not used by optimizer 'sgd'"):
        load_config(job, ["train.optimizer=sgd", "train.eps=1e-6"])
    with pytest.raises(ConfigError, match=r"betas not used by optimizer 'adafactor'"):
        load_config(job, ["train.optimizer=adafactor", "train.betas=[0.8, 0.9]"])
