"""Precision, schedule and optimizer groups of the torch backend.

$ .venvs/torch/bin/python -m pytest tests/backends/torch/test_runtime.py
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from sft.errors import SftError
from sft.events import read_metrics
from sft.specs import TrainSpec
from sft_torch.optim import build_optimizer, lr_factor, warmup_steps
from sft_torch.runtime import cpu_has_native_bf16, resolve_precision
from sft_torch.train import Trainer, fit

from tests.backends.torch.conftest import events_for, make_plan

pytestmark = pytest.mark.torch
CPU = torch.device("cpu")


def test_auto_precision_follows_the_cpu():
    flags = open("/proc/cpuinfo").read()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert cpu_has_native_bf16() == native or "AMX" in torch.backends.cpu.get_cpu_capability()
    assert resolve_precision("auto", CPU) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32"
    with pytest.raises(SftError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU)


def test_explicit_bf16_on_a_cpu_without_it_warns(monkeypatch):
    import warnings

    from sft_torch import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without native bf16 .* many times slower than fp32"):
        assert resolve_precision("bf16", CPU) == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", CPU) == "bf16"


def test_bf16_autocast_trains_with_fp32_master_weights(tmp_path, tiny_llama):
    plan = make_plan(
        tmp_path,
        tiny_llama,
        method="full",
        train={
            "precision": "bf16",
            "max_steps": 8,
            "lr_scheduler": "constant",
            "learning_rate": 3e-3,
            "micro_batch_size": 4,
        },
        n=8,
    )
    trainer = Trainer(plan, events_for(plan))
    result = fit(trainer)
    assert result.metrics["precision"] == "bf16"
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    losses = [r["loss"] for r in read_metrics(plan.run_dir) if "loss" in r]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_schedule_warmup_then_decay_to_min_ratio():
    kw = {"total": 10, "warmup": 2, "min_ratio": 0.1}
    cos = [lr_factor(s, kind="cosine", **kw) for s in range(10)]
    assert cos[:3] == [0.5, 1.0, 1.0]  # warmup: no step at lr 0, peak right after
    assert cos[-1] == pytest.approx(0.1) and all(a >= b for a, b in pairwise(cos[2:]))
    lin = [lr_factor(s, kind="linear", **kw) for s in range(10)]
    assert lin[-1] == pytest.approx(0.1) and lin[6] == pytest.approx(0.1 + 0.9 * 3 / 7)
    assert [lr_factor(s, kind="constant", **kw) for s in (2, 9)] == [1.0, 1.0]
    assert warmup_steps(TrainSpec(warmup_ratio=0.1), 25) == 3
    assert warmup_steps(TrainSpec(warmup_steps=4), 25) == 4


def test_no_weight_decay_on_biases_and_norms(tmp_path, tiny_qwen2):
    plan = make_plan(tmp_path, tiny_qwen2, method="full", train={"weight_decay": 0.1})
    trainer = Trainer(plan, events_for(plan))
    opt = build_optimizer(trainer.model, plan.config.train)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert any(n.endswith("q_proj.bias") for n in plain)
    assert any("norm" in n for n in plain) and not any("norm" in n for n in decayed)
    assert "lm_head.weight" in decayed


def test_pickle_weights_need_allow_pickle(tmp_path, tiny_llama):
    import shutil

    from safetensors.torch import load_file
    from sft_torch.model import load_model

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    plan = make_plan(tmp_path / "a", pickled)
    with pytest.raises(SftError, match="allow_pickle"):
        load_model(plan, CPU)
    plan = make_plan(
        tmp_path / "b", pickled, model={"name_or_path": str(pickled), "allow_pickle": True}
    )
    lm = load_model(plan, CPU)
    ref = load_file(str(tiny_llama / "model.safetensors"))
    assert torch.equal(lm.model.embed_tokens.weight, ref["model.embed_tokens.weight"])


def test_auto_device_on_cpu_says_so_and_why(capsys):
    from sft_torch import runtime

    runtime.say_cpu_fallback.cache_clear()
    assert runtime.resolve_device("auto").type == "cpu"
    err = capsys.readouterr().err
    assert "torch.device auto -> cpu" in err and ("no CUDA support" in err or "sees no GPU" in err)
    runtime.resolve_device("auto")
    assert capsys.readouterr().err == ""  # once per process
    runtime.resolve_device("cpu")
    assert capsys.readouterr().err == ""  # an explicit cpu is no fallback
