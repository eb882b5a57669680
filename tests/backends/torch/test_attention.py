"""`packed_attention: segments` (sft_torch.attention): sdpa per sample of a packed row.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_attention.py

- the kernel-level result equals sdpa under the block-diagonal causal mask, with grouped-query
  heads, several rows, single-token runs and a padding tail;
- what it cannot express (a KV cache while generating) falls back to sdpa with a real mask, so
  greedy generation is unchanged;
- `auto` picks it only for packed sdpa runs; the config check refuses it with eager / flash.
(test_loss_exactness.py checks packed == unpacked loss and gradients through a whole model.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sft_torch import attention
from sft_torch.model import load_model
from sft_torch.train import Trainer

from tests.backends.torch.conftest import events_for, make_plan

pytestmark = pytest.mark.torch


def block_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool: same run of consecutive position ids and key <= query."""
    B, L = position_ids.shape
    seg = torch.zeros(B, L, dtype=torch.long)
    seg[:, 1:] = (position_ids[:, 1:] != position_ids[:, :-1] + 1).long().cumsum(1)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


class Attn(torch.nn.Module):
    is_causal = True


def test_runs_split_at_every_restart():
    pos = torch.tensor([0, 1, 2, 0, 1, 0, 0, 0, 1])
    assert attention.runs(pos) == [(0, 3), (3, 5), (5, 6), (6, 7), (7, 9)]


def test_segment_attention_equals_sdpa_under_the_block_mask():
    torch.manual_seed(0)
    B, H, Hkv, L, D = 2, 4, 2, 23, 8
    rows = [[7, 1, 9, 6], [10, 5]]  # row 2: 15 tokens then 8 padding tokens (position 0 each)
    pos = torch.zeros(B, L, dtype=torch.long)
    for b, lens in enumerate(rows):
        pos[b, : sum(lens)] = torch.cat([torch.arange(n) for n in lens])
    q = torch.randn(B, H, L, D, requires_grad=True)
    k = torch.randn(B, Hkv, L, D, requires_grad=True)
    v = torch.randn(B, Hkv, L, D, requires_grad=True)
    out, _ = attention.segment_attention(Attn(), q, k, v, None, scaling=0.3, position_ids=pos)
    rep = lambda x: x.repeat_interleave(H // Hkv, dim=1)  # noqa: E731
    ref = F.scaled_dot_product_attention(
        q, rep(k), rep(v), attn_mask=block_mask(pos), scale=0.3
    ).transpose(1, 2)
    assert out.shape == (B, L, H, D)
    assert torch.allclose(out, ref, atol=1e-6)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    # control: the mask matters, so plain causal attention over the row is different
    causal = F.scaled_dot_product_attention(q, rep(k), rep(v), is_causal=True, scale=0.3)
    assert not torch.allclose(out, causal.transpose(1, 2), atol=1e-3)


def test_bf16_on_cpu_runs_the_fp32_kernel():
    """bf16 (autocast's q, k, v on CPU): the samples' attention runs in fp32, where torch's CPU
    flash kernel is faster than in bf16, and the output comes back in bf16: exactly the fp32
    result of the same bf16 inputs, rounded once; the gradients reach q, k, v in bf16."""
    torch.manual_seed(0)
    B, H, Hkv, L, D = 1, 4, 2, 19, 8
    pos = torch.cat([torch.arange(n) for n in (9, 6, 4)])[None]
    qkv = [torch.randn(B, h, L, D).bfloat16().requires_grad_() for h in (H, Hkv, Hkv)]
    wide = [t.detach().float().requires_grad_() for t in qkv]
    out, _ = attention.segment_attention(Attn(), *qkv, None, position_ids=pos)
    ref, _ = attention.segment_attention(Attn(), *wide, None, position_ids=pos)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.bfloat16())
    g = torch.randn_like(ref).bfloat16().float()  # what reaches a bf16 output is bf16
    grads = torch.autograd.grad((out.float() * g).sum(), qkv)
    ref_grads = torch.autograd.grad((ref * g).sum(), wide)
    for a, b in zip(grads, ref_grads, strict=True):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.bfloat16())


def test_generation_with_a_kv_cache_is_unchanged(tmp_path, tiny_llama):
    plan = make_plan(tmp_path, tiny_llama, method="full")
    cpu = torch.device("cpu")
    prompt = torch.tensor([[5, 9, 11, 4, 7]])
    outs = []
    for mode in ("position_ids", "segments"):
        lm = load_model(plan, cpu)
        lm.config.use_cache = True
        assert attention.resolve(lm, mode, "sdpa", packing=True) == mode
        outs.append(lm.generate(prompt, max_new_tokens=6, do_sample=False))
    assert lm.config._attn_implementation == attention.NAME
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(
    ("packing", "opts", "want"),
    [
        (True, {}, "segments"),
        (False, {}, "position_ids"),
        (True, {"attn_implementation": "eager"}, "position_ids"),
        (True, {"packed_attention": "mask"}, "mask"),
    ],
)
def test_auto_picks_segments_for_packed_sdpa_runs(tmp_path, tiny_qwen2, packing, opts, want):
    plan = make_plan(tmp_path, tiny_qwen2, packing=packing, torch_opts=opts)
    trainer = Trainer(plan, events_for(plan))
    assert trainer.info()["packed_attention"] == want
    assert trainer.loss_settings.packed == want
    impl = trainer.model.get_base_model().config._attn_implementation
    assert (impl == attention.NAME) == (want == "segments")


def test_segments_with_eager_attention_is_a_config_error(tmp_path):
    from sft.config import load_config
    from sft.errors import ConfigError

    (tmp_path / "x.jsonl").write_text('{"text": "hi"}\n')
    overrides = [
        f"data.train={tmp_path / 'x.jsonl'}",
        "torch.device=cpu",
        "torch.attn_implementation=eager",
        "torch.packed_attention=segments",
    ]
    with pytest.raises(ConfigError, match="packed_attention: segments runs sdpa per sample"):
        load_config(None, overrides)
    load_config(None, [*overrides[:2], overrides[3]])  # with sdpa it is fine
