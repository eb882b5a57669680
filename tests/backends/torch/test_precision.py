"""Precision semantics of the torch backend, the same on every device (issue #20, items 1 and 3):
fp32 master weights + autocast by default, pure bf16 only when asked and then with a compensated
AdamW, fp16 loss scaling on GPUs without native bf16. CUDA decisions are tested with a faked
device; the bf16 arithmetic is the same on CPU, so training runs here.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_precision.py -q
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from sft_torch import runtime
from sft_torch.model import load_kwargs, weights_dtype
from sft_torch.optim import CompensatedAdamW
from sft_torch.plugin import TorchBackend

from tests.backends.torch.conftest import events_for, make_plan

pytestmark = pytest.mark.torch

CUDA = torch.device("cuda", 0)


def fake_gpu(monkeypatch: pytest.MonkeyPatch, native_bf16: bool) -> None:
    """A CUDA device as torch would report it: an A100/H100 (native bf16) or a T4/V100, where
    `is_bf16_supported()` says True by default because it counts emulation."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: native_bf16 or including_emulation,
    )
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda device=None: (9, 0) if native_bf16 else (7, 5)
    )


@pytest.mark.parametrize(("native", "want"), [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda(monkeypatch: pytest.MonkeyPatch, native: bool, want: str) -> None:
    """Item 3: a T4 / V100 gets fp16 with loss scaling, not emulated bf16."""
    fake_gpu(monkeypatch, native)
    assert runtime.resolve_precision("auto", CUDA) == want
    # an explicit half-precision model.dtype sets the compute dtype when precision is auto
    assert runtime.resolve_precision("auto", CUDA, "float16") == "fp16"
    assert runtime.resolve_precision("fp32", CUDA, "auto") == "fp32"


def test_auto_weights_are_fp32_masters_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 1: `model.dtype: auto` on a bf16 GPU loads fp32 master weights (bf16 compute comes
    from autocast), as on CPU; explicit dtypes are kept."""
    fake_gpu(monkeypatch, native_bf16=True)
    assert weights_dtype("auto") == torch.float32
    assert weights_dtype("bfloat16") == torch.bfloat16


def test_qlora_compute_dtype_follows_precision(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_llama: Path
) -> None:
    """Item 3: QLoRA's bitsandbytes compute dtype is the run's precision (fp16 on a T4)."""
    pytest.importorskip("transformers")
    fake_gpu(monkeypatch, native_bf16=False)
    plan = make_plan(tmp_path, tiny_llama, method="qlora")
    precision = runtime.resolve_precision("auto", CUDA)
    quant = load_kwargs(plan, CUDA, precision)["quantization_config"]
    assert quant.bnb_4bit_compute_dtype == torch.float16
    assert load_kwargs(plan, CUDA, "bf16")["quantization_config"].bnb_4bit_compute_dtype == (
        torch.bfloat16
    )


def test_validation_refuses_contradicting_dtypes(tmp_path: Path, tiny_llama: Path) -> None:
    """fp32 training means fp32 weights; fp16 weights cannot train fully under a grad scaler."""
    backend = TorchBackend()
    cfg = make_plan(
        tmp_path,
        tiny_llama,
        method="full",
        model={"dtype": "bfloat16"},
        train={"precision": "fp32"},
    ).config
    problems = backend.validate(cfg)
    assert any("model.dtype: bfloat16 contradicts train.precision: fp32" in p for p in problems)
    cfg = make_plan(
        tmp_path, tiny_llama, method="full", model={"dtype": "float16"}, train={"precision": "auto"}
    ).config
    assert any("model.dtype: float16 with method: full" in p for p in backend.validate(cfg))
    cfg = make_plan(
        tmp_path, tiny_llama, method="lora", model={"dtype": "float16"}, train={"precision": "auto"}
    ).config
    assert any("model.dtype: float16 needs a CUDA GPU" in p for p in backend.validate(cfg))


# ------------------------------------------------------------------------ bf16 weight updates


def quadratic_run(opt_cls: Any, dtype: torch.dtype, steps: int, lr: float = 5e-5) -> tuple:
    """`steps` optimizer steps pulling weights of LLM-like magnitude (N(0, 0.5), norm scales at
    1) towards a target 1.0 away; returns (initial, final) weights as fp32."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.cat([torch.randn(4096, generator=g) * 0.5, torch.ones(512)])
    w0 = w0.bfloat16().float()  # every run starts from the same (bf16-exact) values
    p = torch.nn.Parameter(w0.to(dtype))
    start = p.detach().float().clone()
    opt = opt_cls([p], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        p.grad = (p.detach().float() - (start + 1.0)).to(dtype)
        opt.step()
    return start, p.detach().float()


def test_plain_bf16_adamw_loses_small_updates_compensated_does_not() -> None:
    """Item 1, the arithmetic: at lr 5e-5 torch's AdamW on bf16 weights leaves most of them
    unchanged after 100 steps (each update is below half a bf16 ulp); the compensated AdamW
    moves them, and stays within one bf16 rounding of the fp32 trajectory."""
    runs = {
        "fp32": quadratic_run(torch.optim.AdamW, torch.float32, 100),
        "plain": quadratic_run(torch.optim.AdamW, torch.bfloat16, 100),
        "comp": quadratic_run(CompensatedAdamW, torch.bfloat16, 100),
    }
    stuck = {k: float((end == start).float().mean()) for k, (start, end) in runs.items()}
    assert stuck["fp32"] == 0.0
    assert stuck["plain"] > 0.5, stuck  # the bug this optimizer exists for
    assert stuck["comp"] < 0.02, stuck
    (_, fp32), (_, comp) = runs["fp32"], runs["comp"]
    ulp = torch.finfo(torch.bfloat16).eps * fp32.abs().clamp_min(1e-3)
    assert bool(((comp - fp32).abs() <= ulp).all())


def test_compensated_adamw_matches_torch_adamw_in_fp32() -> None:
    """On fp32 parameters it is AdamW (decoupled weight decay, bias correction)."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 8))
    b = torch.nn.Parameter(a.detach().clone())
    ref = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1)
    mine = CompensatedAdamW([b], lr=1e-2, weight_decay=0.1)
    for i in range(5):
        grad = torch.randn(64, 8, generator=torch.Generator().manual_seed(i))
        a.grad, b.grad = grad.clone(), grad.clone()
        ref.step()
        mine.step()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def frozen_fraction(plan: Any, monkeypatch: pytest.MonkeyPatch, plain: bool = False) -> tuple:
    """(fraction of weights unchanged after the run, weight dtype, optimizer class)."""
    from sft_torch import train as train_mod

    if plain:  # the old behaviour, as a control: torch's AdamW on bf16 parameters
        monkeypatch.setattr(
            train_mod,
            "build_optimizer",
            lambda model, tr: torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad], lr=tr.learning_rate
            ),
        )
    trainer = train_mod.Trainer(plan, events_for(plan))
    before = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()}
    train_mod.fit(trainer)
    same = total = 0
    for n, p in trainer.model.named_parameters():
        # the weight the optimizer holds: a compensated bf16 weight is its bf16 value plus the
        # carried rounding error (what the next steps add before rounding again)
        comp = trainer.optimizer.state.get(p, {}).get("compensation")
        now = p.detach().float() + (0 if comp is None else comp.float())
        same += int((now == before[n]).sum())
        total += p.numel()
    return same / total, next(trainer.model.parameters()).dtype, type(trainer.optimizer)


def test_full_finetune_every_weight_moves_per_precision_mode(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_llama: Path
) -> None:
    """Item 1 end to end: full fine-tuning at lr 5e-5 (configs/smollm2-135m/full.yaml) for 12
    steps, bf16 compute. fp32 master weights (model.dtype auto) and pure bf16 with the
    compensated AdamW (model.dtype bfloat16) move nearly every weight; torch's AdamW on bf16
    weights leaves the larger ones and every norm scale where they were."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)  # no slow-bf16 warning
    train = {"max_steps": 12, "learning_rate": 5e-5, "precision": "bf16", "warmup_steps": 0}
    common = {"method": "full", "train": train, "checkpoint": {"every_steps": None}}
    auto = make_plan(tmp_path / "a", tiny_llama, **common)
    frac_auto, dtype, opt = frozen_fraction(auto, monkeypatch)
    assert dtype == torch.float32 and opt is torch.optim.AdamW
    pure = make_plan(tmp_path / "b", tiny_llama, model={"dtype": "bfloat16"}, **common)
    frac_pure, dtype, opt = frozen_fraction(pure, monkeypatch)
    assert dtype == torch.bfloat16 and opt is CompensatedAdamW
    plain = make_plan(tmp_path / "c", tiny_llama, model={"dtype": "bfloat16"}, **common)
    frac_plain, _, _ = frozen_fraction(plain, monkeypatch, plain=True)
    print(
        f"unchanged after 12 steps: fp32 masters {frac_auto:.3f}, bf16 + compensated "
        f"{frac_pure:.3f}, bf16 + torch AdamW {frac_plain:.3f}"
    )
    # fp32 is the floor: embedding rows of tokens the data never uses get no gradient
    assert frac_auto < 0.15, frac_auto
    assert frac_pure < frac_auto + 0.05, (frac_pure, frac_auto)
    assert frac_plain > frac_auto + 0.3, (frac_plain, frac_auto)


def test_pure_bf16_resume_restores_the_compensation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_llama: Path
) -> None:
    """The compensation buffers are optimizer state: a resumed pure-bf16 run equals the
    uninterrupted one bitwise (without them it would drop what the weights had not yet taken)."""
    from sft.checkpoints import complete_checkpoints
    from sft_torch import train as train_mod

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    common = {
        "method": "full",
        "model": {"dtype": "bfloat16"},
        "train": {"max_steps": 6, "learning_rate": 5e-5, "precision": "bf16"},
        "checkpoint": {"every_steps": 3, "keep_last": 5},
    }

    def run(plan: Any) -> Any:
        trainer = train_mod.Trainer(plan, events_for(plan))
        train_mod.fit(trainer)
        return trainer

    full = run(make_plan(tmp_path / "a", tiny_llama, **common))
    ckpt = complete_checkpoints(full.plan.run_dir)[0]
    resumed = run(make_plan(tmp_path / "b", tiny_llama, resume_from=ckpt, **common))
    assert isinstance(resumed.optimizer, CompensatedAdamW)
    for (n, a), (_, b) in zip(
        full.model.named_parameters(), resumed.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), n
        ca = full.optimizer.state[a]["compensation"]
        assert torch.equal(ca, resumed.optimizer.state[b]["compensation"]), n


def test_lora_modules_to_save_on_a_bf16_base_get_compensated_updates(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_llama: Path
) -> None:
    """LoRA on an explicit bf16 base: adapters are fp32 (peft), the trained copy of a
    `modules_to_save` module is bf16 and gets the compensated update."""
    from sft_torch import train as train_mod

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    method = {"name": "lora", "r": 4, "modules_to_save": ["lm_head"]}
    plan = make_plan(
        tmp_path,
        tiny_llama,
        method=method,
        model={"dtype": "bfloat16"},
        train={"max_steps": 2, "learning_rate": 5e-5, "precision": "auto"},
    )
    trainer = train_mod.Trainer(plan, events_for(plan))
    assert trainer.precision == "bf16" and isinstance(trainer.optimizer, CompensatedAdamW)
    train_mod.fit(trainer)
    trained = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    saved = [p for n, p in trained.items() if "modules_to_save" in n]
    assert saved and all(p.dtype == torch.bfloat16 for p in saved)
    assert all(p.dtype == torch.float32 for n, p in trained.items() if "lora_" in n)
    assert all("compensation" in trainer.optimizer.state[p] for p in saved)
