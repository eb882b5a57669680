"""The torch backend's LoRA adapters start from core's seeded draw (`sft.lora_init`), so the
MindSpore backend (which writes the same matrices into MindFormers' start checkpoint) trains from
the same adapters (issue #22; compared across frameworks in tests/backends/mindspore/test_parity.py).

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_lora_init.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sft.lora_init import lora_a
from sft.specs import LoraMethod
from sft_torch.methods import apply_method
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.torch


def _lora(model_dir, seed):
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return apply_method(lm, LoraMethod(r=4, alpha=8, dropout=0.0), seed=seed)


def test_lora_a_is_core_draw_and_b_is_zero(tiny_llama):
    model = _lora(tiny_llama, seed=3)
    params = dict(model.named_parameters())
    a_names = [n for n in params if ".lora_A." in n]
    assert len(a_names) == 2 * 7  # 2 layers x all-linear
    for name in a_names:
        module = name.removeprefix("base_model.model.").split(".lora_A.")[0]
        a = params[name].detach().numpy()
        assert np.array_equal(a, lora_a(3, module, 4, a.shape[1])), name
        assert not params[name.replace("lora_A", "lora_B")].detach().any()


def test_the_seed_decides_and_peft_rng_does_not(tiny_llama):
    torch.manual_seed(0)
    a = _lora(tiny_llama, seed=3)
    torch.manual_seed(1)  # peft's own draw would differ; the seeded one must not
    b = _lora(tiny_llama, seed=3)
    c = _lora(tiny_llama, seed=4)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    name = next(n for n in pa if ".lora_A." in n)
    assert torch.equal(pa[name], pb[name]) and not torch.equal(pa[name], pc[name])
