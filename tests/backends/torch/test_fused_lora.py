"""`torch.fused_lora` (sft_torch.lora): peft's LoRA Linear as one autograd Function.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_fused_lora.py

It must compute what peft computes: the same outputs and gradients (input, A, B) with and
without a base bias, 2-D and 3-D inputs, with LoRA dropout drawing the same mask as FastDropout
in peft's path; whole-model losses and gradients of a packed batch; the same mask replayed under
gradient checkpointing. Every call it cannot fuse runs peft's forward, and state dicts and
merging are unchanged. The training loop swaps it in by default.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.backends.torch.conftest import events_for, make_plan

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.torch

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402
from sft_torch.dropout import use_fast_dropout  # noqa: E402
from sft_torch.lora import FusedLoraLinear, use_fused_lora  # noqa: E402


class Net(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.a = nn.Linear(16, 24, bias=bias)
        self.b = nn.Linear(24, 8, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def lora_net(bias: bool, p: float, **kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["a", "b"], **kw)
    model = get_peft_model(Net(bias), cfg)
    for mod in model.modules():  # peft starts B at zero: make the adapters contribute
        if isinstance(mod, PeftLinear):
            nn.init.normal_(mod.lora_B["default"].weight, std=0.5)
    use_fast_dropout(model)
    return model.train()


def run(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    return out.detach(), grads


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # fp32 reordering


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(5, 16), (2, 7, 16)])
def test_outputs_and_gradients_equal_peft(bias, p, shape):
    ref = lora_net(bias, p)
    fused = copy.deepcopy(ref)
    assert use_fused_lora(fused) == 2
    x = torch.randn(*shape)
    for seed in (1, 2):  # dropout: the same mask as FastDropout draws in peft's path
        out_r, g_r = run(ref, x, seed)
        out_f, g_f = run(fused, x, seed)
        assert_close(out_f, out_r)
        assert len(g_f) == len(g_r) == 5
        for a, b in zip(g_f, g_r, strict=True):
            assert_close(a, b)
    if p:  # and the mask is really applied: another seed gives another result
        assert not torch.allclose(run(fused, x, 3)[0], out_f)


def test_eval_mode_has_no_dropout():
    ref, x = lora_net(True, 0.5).eval(), torch.randn(3, 16)
    fused = copy.deepcopy(ref)
    use_fused_lora(fused)
    assert_close(fused(x), ref(x))
    assert_close(fused(x), fused(x))


def calls_fused(model: nn.Module, x: torch.Tensor) -> bool:
    layer = model.base_model.model.a
    return layer._fused_args(x) is not None


def test_calls_it_cannot_fuse_run_peft_forward():
    model, x = lora_net(True, 0.1), torch.randn(3, 16)
    use_fused_lora(model)
    assert calls_fused(model, x)
    assert not calls_fused(model, x.double())  # mixed dtypes
    with torch.autocast("cpu", torch.bfloat16):
        assert calls_fused(model, x)  # in the autocast dtype: test_autocast_runs_fused_in_bf16
    with model.disable_adapter():
        assert not calls_fused(model, x)
    model.merge_adapter()
    assert not calls_fused(model, x)
    model.unmerge_adapter()
    layer = model.base_model.model.a
    handle = layer.base_layer.register_forward_hook(lambda *a: None)
    assert not calls_fused(model, x)
    handle.remove()
    layer.base_layer.weight.requires_grad_(True)
    assert not calls_fused(model, x)
    layer.base_layer.weight.requires_grad_(False)
    assert calls_fused(model, x)
    everything_dropped = lora_net(True, 1.0)
    use_fused_lora(everything_dropped)
    assert not calls_fused(everything_dropped, x)
    dora = lora_net(False, 0.0, use_dora=True)
    use_fused_lora(dora)
    assert not calls_fused(dora, x)
    # and the result of a call peft runs is peft's
    ref = lora_net(False, 0.0, use_dora=True)
    assert_close(dora(x), ref(x))


@pytest.mark.parametrize("bf16_base", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_autocast_runs_fused_in_bf16(bf16_base, p):
    """Under bf16 autocast (the CPU default where the CPU has native bf16) the fused Linear
    computes what peft's Linears compute under the same autocast: bf16 matmuls, a bf16 output,
    fp32 gradients for the fp32 adapters and input, equal to bf16 rounding (peft rounds the
    adapter's wide output and scales it there; the fused path scales the rank-r intermediate).
    With the base stored in bf16 (`torch.bf16_frozen_weights`) as well as in fp32."""
    ref = lora_net(True, p)
    if bf16_base:
        for mod in ref.modules():
            if isinstance(mod, PeftLinear):
                mod.base_layer.to(torch.bfloat16)
    fused = copy.deepcopy(ref)
    assert use_fused_lora(fused) == 2
    x = torch.randn(2, 7, 16)
    with torch.autocast("cpu", torch.bfloat16):
        assert calls_fused(fused, x)
        out_r, g_r = run(ref, x, seed=1)
        out_f, g_f = run(fused, x, seed=1)
    assert out_f.dtype == out_r.dtype == torch.bfloat16
    assert [g.dtype for g in g_f] == [g.dtype for g in g_r] == [torch.float32] * 5
    torch.testing.assert_close(out_f, out_r, rtol=2e-2, atol=2e-2)
    for a, b in zip(g_f, g_r, strict=True):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * float(b.abs().max()))
    # and it is bf16 arithmetic, not fp32's: the fp32 run of the same net differs by more
    fp32 = copy.deepcopy(fused).to(torch.float32)
    out_32, _ = run(fp32, x, seed=1)
    assert (out_f.float() - out_32).abs().max() > 1e-3


def test_state_dict_and_merge_unchanged():
    ref = lora_net(True, 0.1)
    fused = copy.deepcopy(ref)
    use_fused_lora(fused)
    sd_r, sd_f = ref.state_dict(), fused.state_dict()
    assert list(sd_r) == list(sd_f)
    assert all(torch.equal(sd_r[k], sd_f[k]) for k in sd_r)
    merged_r, merged_f = ref.merge_and_unload(), fused.merge_and_unload()
    assert type(merged_f.a) is nn.Linear
    assert torch.equal(merged_f.a.weight, merged_r.a.weight)


def packed_batch(vocab: int) -> dict:
    torch.manual_seed(0)
    lens = [9, 6, 1, 8]
    ids = torch.randint(0, vocab, (1, sum(lens)))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    return {"input_ids": ids, "position_ids": pos, "labels": ids.clone(), "seq_lens": [lens]}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_whole_model_loss_and_gradients(tmp_path, tiny_llama, checkpointing):
    from sft_torch.loss import LossSettings, batch_loss
    from sft_torch.train import Trainer, enable_checkpointing

    plan = make_plan(
        tmp_path,
        tiny_llama,
        method={"name": "lora", "r": 4, "dropout": 0.2},
        torch_opts={"fused_lora": False},
        packing=True,
    )
    ref = Trainer(plan, events_for(plan)).model
    for mod in ref.modules():
        if isinstance(mod, PeftLinear):
            nn.init.normal_(mod.lora_B["default"].weight, std=0.05)
    fused = copy.deepcopy(ref)
    assert use_fused_lora(fused) > 0
    models = {"ref": ref, "fused": fused}
    if checkpointing:  # the recompute must draw the forward's dropout masks again
        models["fused-ckpt"] = copy.deepcopy(fused)
        enable_checkpointing(models["fused-ckpt"].base_model.model)
    batch = packed_batch(ref.base_model.model.config.vocab_size)
    results = {}
    for name, model in models.items():
        torch.manual_seed(7)
        loss, n = batch_loss(model, batch, LossSettings(packed="segments"))
        (loss / n).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results[name] = (loss.detach(), grads)
    loss_r, grads_r = results["ref"]
    for name in models:
        loss, grads = results[name]
        assert_close(loss, loss_r)
        for a, b in zip(grads, grads_r, strict=True):
            assert_close(a, b)


@pytest.mark.parametrize("fused", [True, False])
def test_the_loop_swaps_in_fused_lora(tmp_path, tiny_llama, fused):
    from sft_torch.train import Trainer

    plan = make_plan(
        tmp_path, tiny_llama, method={"name": "lora", "r": 4}, torch_opts={"fused_lora": fused}
    )
    trainer = Trainer(plan, events_for(plan))
    kinds = {type(m) for m in trainer.model.modules() if isinstance(m, PeftLinear)}
    assert kinds == ({FusedLoraLinear} if fused else {PeftLinear})
    assert trainer.info()["fused_lora"] is fused
