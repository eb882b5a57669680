"""`torch.fast_dropout` (sft_torch.dropout.FastDropout): CPU dropout masks from 16-bit lanes.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_fast_dropout.py

It must be inverted dropout with the configured p (to 2^-16): the drop rate of every lane of
the 64-bit draws, an unbiased expectation, a gradient that flows through exactly the kept
elements, identity in eval mode, and reproducible under torch.manual_seed. The training loop
swaps it in for peft's LoRA dropout on CPU only.
"""

from __future__ import annotations

import pytest
import torch
from sft_torch.dropout import FastDropout, use_fast_dropout
from sft_torch.train import Trainer

from tests.backends.torch.conftest import events_for, make_plan

pytestmark = pytest.mark.torch


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_rate_and_expectation(p):
    torch.manual_seed(0)
    d = FastDropout(p).train()
    x = torch.ones(4, 250_000, requires_grad=True)  # 10^6 elements: 4 per 64-bit draw
    y = d(x)
    dropped = (y == 0).reshape(-1, 4).float()
    sigma = (p * (1 - p) / dropped.shape[0]) ** 0.5
    for lane in range(4):  # a lane with a stuck sign bit would drop at 0 or 2p
        assert abs(float(dropped[:, lane].mean()) - p) < 8 * sigma
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 65536 / (65536 - round(p * 65536))))
    assert abs(float(y.mean()) - 1.0) < 8 * sigma / (1 - p)
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() * kept[0])


def test_eval_mode_zero_p_and_seeding():
    x = torch.randn(64, 64)
    assert torch.equal(FastDropout(0.1).eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    torch.manual_seed(3)
    a = FastDropout(0.1).train()(x)
    torch.manual_seed(3)
    b = FastDropout(0.1).train()(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, FastDropout(0.1).train()(x))


@pytest.mark.parametrize("fast", [True, False])
def test_the_loop_swaps_lora_dropout_on_cpu(tmp_path, tiny_llama, fast):
    plan = make_plan(
        tmp_path,
        tiny_llama,
        method={"name": "lora", "r": 4, "dropout": 0.1},
        torch_opts={"fast_dropout": fast},
    )
    model = Trainer(plan, events_for(plan)).model
    kinds = {type(m) for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert kinds == ({FastDropout} if fast else {torch.nn.Dropout})
    assert use_fast_dropout(torch.nn.Sequential(torch.nn.Dropout(0.0))) == 0  # p=0 stays
