"""The loss is exact: gradient accumulation, packing and the chunked loss change nothing.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_loss_exactness.py

- micro-batch 1 x accumulation 8 == micro-batch 8 x accumulation 1 on variable-length data
  (padding included): the loss is normalized by the trained tokens of the whole global batch.
- a packed row (several samples, position ids restarting, no attention across samples) gives
  the same loss and gradients as the same samples unpacked, for both ways of keeping samples
  apart (per-sample sdpa, position ids, explicit 4-D mask) and for sdpa and eager attention.
- the chunked linear + cross-entropy (fused or checkpointed chunks) equals the model's own
  full-logits loss.
- the first step's gradient IS the global token mean's gradient, computed independently from the
  model's own logits (SGD, no clipping: the weight change is -lr * gradient, and the logged
  `grad_norm` is its norm). Comparing two configurations after AdamW with clipping cannot see a
  gradient off by a constant factor (AdamW divides it out, clipping caps it); this can.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from sft.data.batching import collate
from sft.events import read_metrics
from sft_torch import attention
from sft_torch.data import to_device
from sft_torch.loss import (
    LOGITS_BUFFERS,
    FrozenCast,
    LogitsBuffers,
    LossSettings,
    batch_loss,
    fusable_head,
)
from sft_torch.methods import apply_method
from sft_torch.model import load_model
from sft_torch.train import Trainer, fit

from tests.backends.torch.conftest import events_for, make_plan

pytestmark = pytest.mark.torch
TOL = 1e-5


def final_weights(tmp_path, model_dir, **kw) -> dict[str, torch.Tensor]:
    plan = make_plan(tmp_path, model_dir, **kw)
    trainer = Trainer(plan, events_for(plan))
    fit(trainer)
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def grad_norms(run_dir) -> list[float]:
    """The `grad_norm` logged at each step (the norm before clipping)."""
    return [r["grad_norm"] for r in read_metrics(run_dir) if "grad_norm" in r]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("chunked", [True, False])
def test_accumulation_equivalence_on_variable_length_data(tmp_path, tiny_llama, chunked):
    common = {"method": "full", "n": 16, "torch_opts": {"chunked_loss": chunked}}
    tr = {"max_steps": 2, "learning_rate": 1e-3}
    a = final_weights(
        tmp_path / "a",
        tiny_llama,
        **common,
        train={**tr, "micro_batch_size": 1, "gradient_accumulation_steps": 8},
    )
    b = final_weights(
        tmp_path / "b",
        tiny_llama,
        **common,
        train={**tr, "micro_batch_size": 8, "gradient_accumulation_steps": 1},
    )
    # a per-micro-batch mean would differ by far more than this (see the control below)
    assert max_diff(a, b) < TOL
    # AdamW divides a constant gradient factor out and clipping caps the norm, so equal weights
    # alone do not show equal gradients: the pre-clipping norms must agree too
    na, nb = grad_norms(tmp_path / "a" / "run"), grad_norms(tmp_path / "b" / "run")
    assert len(na) == len(nb) == 2
    assert na == pytest.approx(nb, rel=TOL)


def global_mean_grads(plan, rows, model=None) -> tuple[float, dict[str, torch.Tensor]]:
    """The token-mean loss over `rows` and its gradient, from the model's own logits (no sft
    loss code): the sum of every trained token's cross-entropy over the count of them."""
    import torch.nn.functional as F

    cpu = torch.device("cpu")
    if model is None:
        model = apply_method(load_model(plan, cpu), plan.config.method)
    model.zero_grad(set_to_none=True)
    total, count = torch.zeros(()), 0
    for i in rows:
        ids, labels = (torch.from_numpy(a.astype("int64"))[None] for a in plan.data.train.sample(i))
        logits = model(input_ids=ids).logits[0, :-1].float()
        target = labels[0, 1:]
        total = total + F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
        count += int((target != -100).sum())
    (total / count).backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return float(total.detach()) / count, grads


def test_per_micro_batch_mean_would_not_be_equivalent(tmp_path, tiny_llama):
    """Control for the equivalence above: on this data, averaging each micro-batch (here each
    sample) separately and then averaging those means (the common bug) gives a gradient that
    differs from the global token mean by far more than TOL, so the test above would see it."""
    plan = make_plan(tmp_path, tiny_llama, method="full", n=8)
    split = plan.data.train
    counts = [int((split.sample(i)[1][1:] != -100).sum()) for i in range(len(split))]
    assert len(set(counts)) > 3  # unequal trained tokens per sample
    model = apply_method(load_model(plan, torch.device("cpu")), plan.config.method)
    _, right = global_mean_grads(plan, range(8), model)
    per_sample = [global_mean_grads(plan, [i], model)[1] for i in range(8)]
    wrong = {k: sum(g[k] for g in per_sample) / 8 for k in right}
    scale = max(float(g.abs().max()) for g in right.values())
    assert max_diff(right, wrong) > 100 * TOL * max(scale, 1.0)
    # and a constant factor (the other common bug) is just as visible
    doubled = {k: 2 * g for k, g in right.items()}
    assert max_diff(right, doubled) > 100 * TOL * max(scale, 1.0)


def global_norm(grads: dict[str, torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])))


LR = 0.5  # large, so the weight change stands far above float rounding of the weights


@pytest.mark.parametrize(
    "layout",
    [
        {"micro_batch_size": 1, "gradient_accumulation_steps": 8},
        {"micro_batch_size": 8, "gradient_accumulation_steps": 1},
        {"micro_batch_size": 2, "gradient_accumulation_steps": 4, "chunked": False},
    ],
    ids=["accumulate-8", "one-batch", "2x4-full-logits"],
)
def test_first_step_gradient_is_the_global_token_mean(tmp_path, tiny_llama, layout):
    """One plain SGD step (no momentum yet on step 1, no clipping): the weight change is exactly
    -lr times the gradient, which must equal the gradient of the token-mean cross-entropy
    over the step's 8 samples computed here from the model's logits; the logged grad_norm is
    its norm. A constant factor anywhere in the loss normalisation fails this, in every layout."""
    layout = dict(layout)
    chunked = layout.pop("chunked", True)
    plan = make_plan(
        tmp_path,
        tiny_llama,
        method="full",
        n=8,  # one global batch of 8 = every sample, in whatever order
        torch_opts={"chunked_loss": chunked},
        train={
            "max_steps": 1,
            "optimizer": "sgd",
            "learning_rate": LR,
            "lr_scheduler": "constant",
            "max_grad_norm": None,
            **layout,
        },
    )
    loss, expected = global_mean_grads(plan, range(8))
    trainer = Trainer(plan, events_for(plan))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    fit(trainer)
    got = {n: (before[n] - p.detach()) / LR for n, p in trainer.model.named_parameters()}
    scale = max(float(g.abs().max()) for g in expected.values())
    norm = global_norm(expected)
    worst = max_diff(got, expected)
    assert worst < 1e-4 * scale, (
        f"step-1 gradient differs from the global token mean's by {worst:.3g} (largest entry "
        f"{scale:.3g}); norm ratio {global_norm(got) / norm:.4f}"
    )
    (row,) = [r for r in read_metrics(plan.run_dir) if "grad_norm" in r]
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert row["loss"] == pytest.approx(loss, rel=1e-5)


def loss_and_grads(model, batch, settings):
    model.zero_grad(set_to_none=True)
    loss, n = batch_loss(model, batch, settings)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), n, grads


@pytest.fixture(scope="module")
def samples_plan(tmp_path_factory, tiny_qwen2):
    return make_plan(
        tmp_path_factory.mktemp("pack"), tiny_qwen2, method="full", n=5, data={"max_seq_len": 128}
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("packed", ["segments", "position_ids", "mask"])
def test_packed_equals_unpacked(samples_plan, attn, packed):
    if packed == "segments" and attn == "eager":
        pytest.skip("segments is an sdpa mode (the config check refuses it with eager)")
    plan = samples_plan
    plan.options = plan.options.model_copy(update={"attn_implementation": attn})
    cpu = torch.device("cpu")
    lm = load_model(plan, cpu)
    assert attention.resolve(lm, packed, attn, packing=True) == packed
    model = apply_method(lm, plan.config.method)
    model.train()
    split, settings = plan.data.train, LossSettings(packed=packed)
    rows = [[0, 1, 2], [3, 4]]  # two packed rows (the second one padded)
    packed_batch = to_device(collate(split, rows, pad_id=0), cpu)
    assert packed_batch["seq_lens"][0] == [len(split.sample(i)[0]) for i in rows[0]]
    single = to_device(collate(split, [[i] for r in rows for i in r], pad_id=0), cpu)
    lp, np_, gp = loss_and_grads(model, packed_batch, settings)
    lu, nu, gu = loss_and_grads(model, single, settings)
    assert np_ == nu > 0
    assert abs(lp - lu) < TOL * max(1.0, abs(lu))
    assert max_diff(gp, gu) < TOL

    # Control: the same packed row with position ids that do NOT restart lets samples attend
    # to each other, and the loss changes; so the equality above is not vacuous.
    leaky = dict(packed_batch)
    leaky["position_ids"] = (
        torch.arange(packed_batch["input_ids"].shape[1])
        .expand_as(packed_batch["position_ids"])
        .contiguous()
    )
    leaky["seq_lens"] = [[sum(r)] for r in packed_batch["seq_lens"]]
    ll, _, _ = loss_and_grads(model, leaky, settings)
    assert abs(ll - lu) > 1e-3


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("head_trains", [True, False])
def test_chunked_loss_equals_full_logits_loss(samples_plan, fused, head_trains):
    """Both chunked paths (gradients in the forward pass / checkpointed chunks), with a head
    that trains (full fine-tuning) and a frozen one (LoRA)."""
    plan = samples_plan
    cpu = torch.device("cpu")
    model = apply_method(load_model(plan, cpu), plan.config.method)
    head = model.get_output_embeddings()
    head.weight.requires_grad_(head_trains)
    assert fusable_head(head)
    batch = to_device(collate(plan.data.train, [[0, 1], [2], [3, 4]], pad_id=0), cpu)
    settings = LossSettings(chunked=True, chunk_size=7, fused=fused)
    lc, nc, gc = loss_and_grads(model, batch, settings)
    lf, nf, gf = loss_and_grads(model, batch, LossSettings(chunked=False))
    assert nc == nf and abs(lc - lf) < TOL * abs(lf)
    assert set(gc) == set(gf)
    assert ("lm_head.weight" in gc) == head_trains
    assert max_diff(gc, gf) < TOL


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("head_trains", [True, False])
def test_reused_logits_buffers_change_nothing(samples_plan, autocast, head_trains):
    """`LossSettings.reuse_logits` (the CPU default: `sft_torch.loss.LogitsBuffers`): the same
    loss and gradients bit for bit, in fp32 and under bf16 autocast, and the second call
    computes its logits in the first call's buffer."""
    plan = samples_plan
    cpu = torch.device("cpu")
    model = apply_method(load_model(plan, cpu), plan.config.method)
    model.get_output_embeddings().weight.requires_grad_(head_trains)
    batch = to_device(collate(plan.data.train, [[0, 1], [2], [3, 4]], pad_id=0), cpu)
    LOGITS_BUFFERS.clear()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        plain = loss_and_grads(model, batch, LossSettings(chunk_size=7))
        reused = loss_and_grads(model, batch, LossSettings(chunk_size=7, reuse_logits=True))
        bufs = [b.data_ptr() for b in LOGITS_BUFFERS._free]
        again = loss_and_grads(model, batch, LossSettings(chunk_size=7, reuse_logits=True))
    # fp32 logits, and under autocast their bf16 product too; lent again, not new ones
    assert sorted(str(b.dtype) for b in LOGITS_BUFFERS._free) == (
        ["torch.bfloat16", "torch.float32"] if autocast else ["torch.float32"]
    )
    assert [b.data_ptr() for b in LOGITS_BUFFERS._free] == bufs
    assert plain[:2] == reused[:2] == again[:2]
    assert max_diff(plain[2], reused[2]) == 0.0 and max_diff(plain[2], again[2]) == 0.0
    LOGITS_BUFFERS.clear()


@pytest.mark.parametrize("head_trains", [True, False])
def test_fused_loss_under_autocast_is_autocasts_own(samples_plan, head_trains):
    """Under bf16 autocast the fused loss computes what autograd computes for the checkpointed
    chunks under the same autocast (head matmuls in bf16, softmax in fp32), although it casts
    the head's weight once per call instead of at every matmul; and that is not fp32's result
    (so the comparison would see a matmul left in fp32)."""
    plan = samples_plan
    cpu = torch.device("cpu")
    model = apply_method(load_model(plan, cpu), plan.config.method)
    model.get_output_embeddings().weight.requires_grad_(head_trains)
    batch = to_device(collate(plan.data.train, [[0, 1], [2], [3, 4]], pad_id=0), cpu)
    fp32 = loss_and_grads(model, batch, LossSettings(chunk_size=7, fused=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = loss_and_grads(model, batch, LossSettings(chunk_size=7, fused=True))
        ref = loss_and_grads(model, batch, LossSettings(chunk_size=7, fused=False))
    scale = max(float(g.abs().max()) for g in ref[2].values())
    assert max_diff(fused[2], ref[2]) < 1e-2 * scale  # bf16 rounding of the same products
    # measured: the losses are equal (0.0) and 9e-6 from fp32's; the frozen head's gradients
    # are equal too, a training head's within 0.6% (its bf16 chunk products summed in fp32)
    assert fused[1] == ref[1] and abs(fused[0] - ref[0]) < 1e-7 * abs(ref[0])
    assert abs(fused[0] - fp32[0]) > 2e-6 * abs(ref[0])


def test_frozen_cast_is_kept_while_the_weight_is_unchanged():
    """`FrozenCast` (the frozen head's bf16 copy, kept between micro-batches): the same copy
    while the weight is unchanged, a new one after an in-place update or for another tensor,
    and none kept for a trainable weight (it changes every step)."""
    cache = FrozenCast()
    w = torch.randn(6, 4)
    a, b = cache.get(w, torch.bfloat16), cache.get(w, torch.bfloat16)
    assert a.data_ptr() == b.data_ptr() and torch.equal(a, w.bfloat16())
    with torch.no_grad():
        w.add_(1.0)  # an optimizer step, a checkpoint load: the version counter moves
    c = cache.get(w, torch.bfloat16)
    assert c.data_ptr() != a.data_ptr() and torch.equal(c, w.bfloat16())
    other = w.clone()
    assert cache.get(other, torch.bfloat16).data_ptr() != c.data_ptr()
    trainable = torch.randn(6, 4, requires_grad=True)
    cache.clear()
    cache.get(trainable, torch.bfloat16)
    assert cache._low is None
    assert cache.get(w, torch.float32) is w  # already in the dtype: nothing to keep


def test_logits_buffers_are_lent_to_one_caller_at_a_time():
    pool = LogitsBuffers(keep=2)
    with pool.lend(5, 10, torch.device("cpu")) as a, pool.lend(5, 10, torch.device("cpu")) as b:
        assert a.data_ptr() != b.data_ptr()  # concurrent callers (micro-batch threads)
        assert a.numel() == LogitsBuffers.ROWS * 10  # rows rounded up to a multiple of ROWS
    with pool.lend(3, 10, torch.device("cpu")) as c:
        assert c.data_ptr() in (a.data_ptr(), b.data_ptr())
    with pool.lend(LogitsBuffers.ROWS + 1, 10, torch.device("cpu")) as big:
        assert big.numel() == 2 * LogitsBuffers.ROWS * 10
    assert sorted(x.numel() for x in pool._free) == [640, 1280]  # keep=2: the largest stay
    with pool.lend(3, 10, torch.device("cpu"), torch.bfloat16) as low:
        assert low.dtype == torch.bfloat16  # a buffer of another dtype is never lent
    assert {x.dtype for x in pool._free} <= {torch.float32, torch.bfloat16}
    pool.clear()
    assert pool._free == []


def test_fused_loss_is_used_only_on_a_plain_head(samples_plan):
    """A head that is wrapped (peft modules_to_save, FSDP2/ZeRO-3 hooks) or has a bias goes
    through checkpointed chunks: the fused loss reads .weight directly."""
    plan = samples_plan
    head = load_model(plan, torch.device("cpu")).get_output_embeddings()
    assert fusable_head(head)
    handle = head.register_forward_pre_hook(lambda *a: None)
    assert not fusable_head(head)
    handle.remove()
    assert not fusable_head(torch.nn.Linear(4, 8, bias=True))


def test_gradient_checkpointing_changes_nothing(tmp_path, tiny_llama):
    tr = {"max_steps": 2, "micro_batch_size": 4, "gradient_accumulation_steps": 1}
    a = final_weights(tmp_path / "a", tiny_llama, method="lora", train=tr)
    b = final_weights(
        tmp_path / "b", tiny_llama, method="lora", train={**tr, "gradient_checkpointing": True}
    )
    assert max_diff(a, b) < TOL


def test_eval_loss_is_the_token_mean_over_held_out_samples(tmp_path, tiny_llama):
    """Trainer.evaluate (packed eval rows, chunked loss) against a plain per-sample
    computation with the model's own logits."""
    import math

    import torch.nn.functional as F

    plan = make_plan(tmp_path, tiny_llama, method="full", eval_n=6, packing=True)
    trainer = Trainer(plan, events_for(plan))
    got = trainer.evaluate()
    split, total, count = plan.data.eval, 0.0, 0
    trainer.model.eval()
    with torch.no_grad():
        for i in range(len(split)):
            ids, labels = (torch.from_numpy(a.astype("int64"))[None] for a in split.sample(i))
            logits = trainer.model(input_ids=ids).logits[0, :-1]
            target = labels[0, 1:]
            total += float(F.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    assert got["eval_tokens"] == count
    assert abs(got["eval_loss"] - total / count) < 1e-5
    assert got["eval_ppl"] == pytest.approx(math.exp(total / count))
