"""The architecture matrix (issue 17): every decoder-only model type in `sft.archs` that this
transformers ships, as a tiny random model (tests/archs.py), through the real torch backend.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_archs.py -q

Every architecture x method (full, LoRA, freeze):
- a packed row (the attention the backend picks for it: `segments`, or position ids with
  eager/sdpa) gives the loss and gradients of the same samples unpacked (1e-5, fp32); a row
  whose samples may see each other does not (so the equality is not vacuous);
- training with the levers (fused LoRA, chunked loss, micro-batch threads) gives the losses of
  plain peft / full logits / one thread, and the loss moves.
On a representative subset (dense, soft-capped eager, MoE, MLA): resume after a stop is bitwise
equal; the merged HF export and the PEFT adapter reload in a fresh process and reproduce the
trained model's loss. The GGUF export of every architecture reads back with gguf-py's reader, or
is refused with the reason `sft.archs` gives.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sft.archs import ARCHITECTURES, VERIFIED
from sft.checkpoints import complete_checkpoints
from sft.data.batching import collate
from sft.errors import SftError
from sft.events import read_metrics
from sft.export import ExportRequest, run_export
from sft_torch import attention
from sft_torch.data import to_device
from sft_torch.loss import LossSettings, batch_loss
from sft_torch.methods import apply_method
from sft_torch.model import load_model
from sft_torch.train import Trainer, fit
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from tests.archs import build
from tests.backends.torch.conftest import events_for, make_plan

pytestmark = pytest.mark.torch

ARCHS = [a for a in ARCHITECTURES if a in CONFIG_MAPPING_NAMES]
METHODS = {
    "full": "full",
    "lora": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    "freeze": {"name": "freeze", "trainable_layers": 1},
}
MOE = {"qwen3_moe", "mixtral", "deepseek_v3"}
SUBSET = ["llama", "gemma2", "qwen3_moe", "deepseek_v3"]
"""The costly checks (resume, exports): dense llama3-rope, eager soft-capped gemma2, MoE, MLA."""
TOL = 1e-5


@pytest.fixture(scope="session")
def arch_models(tmp_path_factory):
    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = build(tmp_path_factory.mktemp(model_type), model_type)
        return built[model_type]

    return get


def loss_and_grads(model, batch, settings):
    model.zero_grad(set_to_none=True)
    loss, n = batch_loss(model, batch, settings)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), n, grads


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a - b| over all tensors, relative to max |b| (gradients of a 0.2-std init are big)."""
    assert a.keys() == b.keys() and a
    scale = max(1.0, max(float(t.abs().max()) for t in b.values()))
    return max(float((a[k] - b[k]).abs().max()) for k in a) / scale


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_equals_unpacked(tmp_path, arch_models, arch, method):
    model_dir = arch_models(arch)
    plan = make_plan(tmp_path, model_dir, method=METHODS[method], n=5, data={"max_seq_len": 128})
    cpu = torch.device("cpu")
    lm = load_model(plan, cpu)
    own = lm.config._attn_implementation  # transformers' own kernel: the unpacked reference
    mode = attention.resolve(lm, "auto", "auto", packing=True)
    model = apply_method(lm, plan.config.method)
    model.train()
    split, settings = plan.data.train, LossSettings(packed=mode)
    rows = [[0, 1, 2], [3, 4]]
    packed = to_device(collate(split, rows, pad_id=0), cpu)
    single = to_device(collate(split, [[i] for r in rows for i in r], pad_id=0), cpu)
    lp, n_p, gp = loss_and_grads(model, packed, settings)
    picked = lm.config._attn_implementation
    lm.set_attn_implementation(own)
    lu, n_u, gu = loss_and_grads(model, single, settings)
    lm.set_attn_implementation(picked)
    assert n_p == n_u > 0
    assert abs(lp - lu) < TOL * max(1.0, abs(lu)), (arch, mode, lp, lu)
    assert rel_diff(gp, gu) < TOL, (arch, mode)
    # control: position ids that do not restart let the samples see each other
    leaky = dict(packed)
    leaky["position_ids"] = torch.arange(packed["input_ids"].shape[1]).expand_as(
        packed["position_ids"]
    )
    leaky["seq_lens"] = [[sum(r)] for r in packed["seq_lens"]]
    ll, _, _ = loss_and_grads(model, leaky, settings)
    assert abs(ll - lu) > 1e-4, (arch, ll, lu)


TRAIN = {"max_steps": 3, "micro_batch_size": 1, "gradient_accumulation_steps": 2}
PLAIN = {"chunked_loss": False, "fused_lora": False, "micro_batch_threads": 1}
LEVERS = {"chunked_loss": True, "loss_chunk_size": 5, "fused_lora": True, "micro_batch_threads": 2}


def losses_of(tmp_path: Path, model_dir: Path, method, opts, **kw) -> tuple[Trainer, dict]:
    plan = make_plan(
        tmp_path,
        model_dir,
        method=method,
        n=8,
        train={**TRAIN, **kw.pop("train", {})},
        torch_opts=opts,
        **kw,
    )
    trainer = Trainer(plan, events_for(plan))
    fit(trainer)
    return trainer, {r["step"]: r["loss"] for r in read_metrics(plan.run_dir) if "loss" in r}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHS)
def test_levers_train_what_plain_training_trains(tmp_path, arch_models, arch, method):
    model_dir = arch_models(arch)
    plain, lp = losses_of(tmp_path / "plain", model_dir, METHODS[method], PLAIN)
    threads = 2
    if method == "lora" and arch in MOE:
        # peft's LoRA on expert parameters is module state per forward: threads are refused,
        # and auto (2 torch threads on 2 cores) falls back to one (it crashed in backward)
        with pytest.raises(SftError, match="LoRA on expert parameters"):
            losses_of(tmp_path / "refused", model_dir, METHODS[method], LEVERS)
        threads, levers = 1, {k: v for k, v in LEVERS.items() if k != "micro_batch_threads"}
        torch.set_num_threads(2)
        try:
            fast, lf = losses_of(tmp_path / "levers", model_dir, METHODS[method], levers)
        finally:
            torch.set_num_threads(1)
    else:
        fast, lf = losses_of(tmp_path / "levers", model_dir, METHODS[method], LEVERS)
    assert fast.micro_batch_threads == threads and plain.micro_batch_threads == 1
    assert (fast.fused_lora > 0) == (method == "lora")
    assert sorted(lp) == sorted(lf) == [1, 2, 3]
    for s in lp:
        assert lf[s] == pytest.approx(lp[s], rel=TOL), (arch, s, lf, lp)
    assert lp[3] != lp[1]  # it trains


@pytest.mark.parametrize("arch", SUBSET)
def test_resume_is_bitwise_equal(tmp_path, arch_models, arch):
    model_dir = arch_models(arch)
    kw = {"train": {"max_steps": 4}, "checkpoint": {"every_steps": 2, "keep_last": 5}}
    a, la = losses_of(tmp_path / "a", model_dir, METHODS["lora"], {}, **kw)
    mid = complete_checkpoints(tmp_path / "a" / "run")[0]
    b, lb = losses_of(tmp_path / "b", model_dir, METHODS["lora"], {}, resume_from=mid, **kw)
    assert sorted(lb) == [3, 4] and all(lb[s] == la[s] for s in lb)
    wa = dict(a.model.named_parameters())
    assert all(torch.equal(p, wa[n]) for n, p in b.model.named_parameters())


RELOAD = r"""
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, merged, adapter, ids = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
x = torch.tensor(ids)
def loss(m):
    with torch.no_grad():
        return float(m(input_ids=x, labels=x).loss)
out = {"merged": loss(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))}
lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
out["adapter"] = loss(PeftModel.from_pretrained(lm, adapter))
print(json.dumps(out))
"""


@pytest.mark.parametrize("arch", SUBSET)
def test_merged_and_adapter_exports_reload_in_a_fresh_process(tmp_path, arch_models, arch):
    model_dir = arch_models(arch)
    trainer, _ = losses_of(tmp_path, model_dir, METHODS["lora"], {}, train={"learning_rate": 5e-2})
    run = tmp_path / "run"
    for fmt in ("hf", "adapter"):
        report = run_export(fmt, ExportRequest(run_dir=run, out=tmp_path / fmt, dtype="f32"))
        assert report.ok, report.checks
    ids = [[3 + (7 * k) % 50 for k in range(20)]]
    x = torch.tensor(ids)
    model = trainer.model.eval()
    with torch.no_grad():
        trained = float(model(input_ids=x, labels=x).loss)
        with model.disable_adapter():
            untrained = float(model(input_ids=x, labels=x).loss)
    assert abs(trained - untrained) > 1e-3  # the adapter matters
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            RELOAD,
            str(model_dir),
            str(tmp_path / "hf"),
            str(tmp_path / "adapter"),
            json.dumps(ids),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["merged"] == pytest.approx(trained, rel=1e-4), (arch, got, trained)
    assert got["adapter"] == pytest.approx(trained, rel=1e-5), (arch, got, trained)


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_export_reads_back_or_is_refused_with_the_reason(tmp_path, arch_models, arch):
    import gguf

    status = ARCHITECTURES[arch].gguf
    model_dir = arch_models(arch)
    if arch == "mistral":  # the sliding window is refused; Mistral v0.3 has none
        with pytest.raises(SftError, match="sliding_window"):
            run_export("gguf", ExportRequest(run_dir=model_dir, out=tmp_path / "sw", dtype="f32"))
        cfg = json.loads((model_dir / "config.json").read_text())
        model_dir = tmp_path / "mistral-v03"
        model_dir.mkdir()
        for f in arch_models(arch).iterdir():
            (model_dir / f.name).write_bytes(f.read_bytes())
        (model_dir / "config.json").write_text(json.dumps({**cfg, "sliding_window": None}))
    if not status.startswith(VERIFIED):
        with pytest.raises(SftError, match=r"GGUF export supports|rope scaling"):
            run_export("gguf", ExportRequest(run_dir=model_dir, out=tmp_path, dtype="f32"))
        return
    report = run_export("gguf", ExportRequest(run_dir=model_dir, out=tmp_path, dtype="f32"))
    assert report.ok and report.checks["problems"] == [], report.checks
    reader = gguf.GGUFReader(report.path)
    assert len(reader.tensors) == report.checks["tensors_compared"] > 0


def test_auto_attention_picks_eager_where_the_model_has_no_sdpa(tmp_path, arch_models):
    from sft_torch.model import load_kwargs

    plan = make_plan(tmp_path, arch_models("gemma2"), method="full", train={"max_steps": 1})
    assert load_kwargs(plan, torch.device("cpu"), "fp32")["attn_implementation"] == "eager"
    trainer = Trainer(plan, events_for(plan))
    assert trainer.info()["attn_implementation"] == "eager"  # the run says what it picked
    assert trainer.packed_attention == "position_ids"
    sdpa = make_plan(
        tmp_path / "s", arch_models("gemma2"), torch_opts={"attn_implementation": "sdpa"}
    )
    with pytest.raises(SftError, match=r"torch.attn_implementation: sdpa: Gemma2ForCausalLM"):
        load_model(sdpa, torch.device("cpu"))
    llama = make_plan(tmp_path / "l", arch_models("llama"), method="full")
    assert load_kwargs(llama, torch.device("cpu"), "fp32")["attn_implementation"] == "sdpa"


def test_sft_run_warns_for_a_model_type_outside_the_matrix(tmp_path, arch_models, capsys):
    from sft.config import load_config
    from sft.run import build_plan

    model = tmp_path / "moe"
    model.mkdir()
    for f in arch_models("qwen2").iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2_moe"}))
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    spec = tmp_path / "c.yaml"
    spec.write_text(
        f"model: {model}\ndata: {{train: {tmp_path / 'd.jsonl'}}}\noutput_dir: {tmp_path / 'r'}\n"
    )
    build_plan(load_config(spec))
    err = capsys.readouterr().err
    assert "warning: model_type 'qwen2_moe' is not in sft's tested architecture matrix" in err
    assert "nearest tested one is 'qwen2'" in err
    spec.write_text(spec.read_text().replace(str(model), str(arch_models("qwen2"))))
    build_plan(load_config(spec))
    assert "architecture matrix" not in capsys.readouterr().err  # control: a tested type
