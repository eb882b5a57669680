"""GPU-only paths of the torch backend: QLoRA (bitsandbytes 4-bit NF4 base + LoRA) and fp16
with loss scaling. Skipped where there is no CUDA GPU (as on the CPU CI machines).

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_gpu.py     # on a GPU host
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from sft_torch.train import Trainer, fit

from tests.backends.torch.conftest import events_for, make_plan
from tests.backends.torch.test_fp16 import assert_fp16_tracks_fp32

pytestmark = [
    pytest.mark.torch,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="needs bitsandbytes (pip install 'sft-torch[qlora]')",
)
def test_qlora_trains_adapters_on_a_4bit_base(tmp_path, tiny_llama):
    import bitsandbytes as bnb

    plan = make_plan(
        tmp_path,
        tiny_llama,
        method={"name": "qlora", "r": 4},
        train={"max_steps": 3, "precision": "bf16"},
        torch_opts={"device": "cuda"},
    )
    trainer = Trainer(plan, events_for(plan))
    quantized = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized, "the base linear layers should be 4-bit"
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    result = fit(trainer)
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert "adapter" in result.outputs


def test_fp16_autocast_with_loss_scaling(tmp_path, tiny_llama):
    """Same loss and gradient norm at every step as fp32 on the GPU, no skipped step, the scale
    untouched (test_fp16.py runs the same check on CPU)."""
    assert_fp16_tracks_fp32(tmp_path, tiny_llama, "cuda")
