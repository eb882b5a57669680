"""The hf and adapter exporters on runs trained by the real torch training loop (tiny models).

$ .venvs/torch/bin/python -m pytest tests/backends/torch/test_export.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sft.errors import SftError
from sft.export import ExportRequest, run_export
from sft.plugins import get_plugins
from sft_torch.export import check_template_parity, logits_of, probe_batch
from sft_torch.generate import load_for_inference
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.backends.torch.conftest import make_plan, run_train

pytestmark = pytest.mark.torch

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def trained_run(tmp_path: Path, model_dir: Path, method: str = "lora") -> Path:
    """A real run directory: a few steps of the torch backend (adapter or full model)."""
    plan = make_plan(tmp_path, model_dir, method=method, train={"max_steps": 3})
    run_train(plan)
    return plan.run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama) -> Path:
    return trained_run(tmp_path_factory.mktemp("lora-run"), tiny_llama)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
def test_hf_export_merges_lora_and_matches_base_plus_adapter(arch, tmp_path, request):
    model_dir = request.getfixturevalue(arch)
    run = trained_run(tmp_path, model_dir)
    report = run_export("hf", ExportRequest(run_dir=run, out=tmp_path / "hf", dtype="f32"))
    c = report.checks
    assert report.ok and c["merged"] and c["max_abs_logit_diff"] < 1e-4, c
    assert c["template_ids_equal"] and c["eos_ids_agree"] and c["eos_ids"] == [2]
    out = tmp_path / "hf"
    assert not (out / "adapter_config.json").exists()
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    # The adapter must matter, or the comparison above proves nothing.
    tok = AutoTokenizer.from_pretrained(str(out))
    seqs = probe_batch(tok)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    diff = max(
        float((a - b).abs().max())
        for a, b in zip(logits_of(base, seqs), logits_of(merged, seqs), strict=True)
    )
    assert diff > 1e-3


def test_hf_export_of_a_full_run_in_bf16_reports_kl(tmp_path, tiny_qwen2):
    run = trained_run(tmp_path, tiny_qwen2, method="full")
    report = run_export("hf", ExportRequest(run_dir=run, out=tmp_path / "hf", dtype="bf16"))
    assert report.ok and report.checks["source"] == "model"
    assert 0 < report.checks["mean_kl"] < 2e-2
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert loaded.dtype == torch.bfloat16


def test_adapter_export_reloads_with_plain_peft(tmp_path, lora_run):
    report = run_export("adapter", ExportRequest(run_dir=lora_run, out=tmp_path / "ad"))
    assert report.ok and report.checks["max_abs_logit_diff"] < 1e-6, report.checks
    assert (tmp_path / "ad" / "adapter_config.json").is_file()
    assert not (tmp_path / "ad" / "model.safetensors").exists()


def test_adapter_export_of_a_full_run_is_a_clear_error(tmp_path, tiny_llama):
    run = trained_run(tmp_path, tiny_llama, method="full")
    with pytest.raises(SftError, match="no PEFT adapter"):
        run_export("adapter", ExportRequest(run_dir=run, out=tmp_path / "ad"))


def test_mismatched_template_fails_the_export_loudly(tmp_path, lora_run):
    llama3 = tmp_path / "llama3.jinja"
    llama3.write_text(get_plugins().templates.get("llama3").source)
    req = ExportRequest(
        run_dir=lora_run, out=tmp_path / "hf", dtype="f32", options={"chat_template": str(llama3)}
    )
    with pytest.raises(SftError, match="failed its verification") as err:
        run_export("hf", req)
    assert "'template_ids_equal': False" in str(err.value)

    # A template that renders, but differently (a space instead of chatml's newline).
    chatml = get_plugins().templates.get("chatml").source
    (tmp_path / "near.jinja").write_text(chatml.replace("role'] + '\n'", "role'] + ' '"))
    req.options = {"chat_template": str(tmp_path / "near.jinja")}
    with pytest.raises(SftError, match="failed its verification"):
        run_export("hf", req)
    report = json.loads((tmp_path / "hf" / "export-hf.json").read_text())
    assert report["ok"] is False and report["checks"]["first_mismatch"]["position"] > 0


def tokenizer_with(
    tmp_path: Path,
    tiny_tokenizer: Path,
    name: str,
    template: str,
    extra_special: list[str],
    eos: str,
) -> Path:
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    if extra_special:  # llama3-style: its own BOS and header / end-of-turn tokens
        tok.add_special_tokens(
            {"bos_token": extra_special[0], "additional_special_tokens": extra_special[1:]}
        )
    tok.chat_template = template
    out = tmp_path / name
    tok.save_pretrained(str(out))
    eos_id = tok.convert_tokens_to_ids(eos)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos_id]}))
    return out


LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.mark.parametrize(
    "name,special,eos",
    [
        ("chatml", [], "<|im_end|>"),
        ("llama3", LLAMA3_SPECIAL, "<|eot_id|>"),
        ("smollm2", [], "<|im_end|>"),
    ],
)
def test_template_parity_passes_for_matching_and_fails_for_mismatched(
    name, special, eos, tmp_path, tiny_tokenizer
):
    plugins = get_plugins()
    template = SMOLLM2_TEMPLATE if name == "smollm2" else plugins.templates.get(name).source
    ref = tokenizer_with(tmp_path, tiny_tokenizer, "ref", template, special, eos)
    # An export writes the same tokenizer again: parity must hold, eos = the end of turn.
    same = tokenizer_with(tmp_path, tiny_tokenizer, "same", template, special, eos)
    checks = check_template_parity(same, ref)
    assert checks["template_ids_equal"] and checks["eos_ids_agree"], checks
    assert checks["end_of_turn_id"] == AutoTokenizer.from_pretrained(
        str(ref)
    ).convert_tokens_to_ids(eos)
    other = plugins.templates.get("vicuna_v1.1" if name != "chatml" else "llama3").source
    wrong = tokenizer_with(tmp_path, tiny_tokenizer, "wrong", other, special, eos)
    assert not check_template_parity(wrong, ref)["template_ids_equal"]
    # Right template, but generation_config.json stops at the wrong token: a model that never
    # stops. The eos check must catch it.
    bad_eos = tokenizer_with(tmp_path, tiny_tokenizer, "bad-eos", template, special, "<|im_start|>")
    assert not check_template_parity(bad_eos, ref)["eos_ids_agree"]


def test_load_for_inference_reads_adapter_runs(lora_run):
    loaded = load_for_inference(lora_run)
    assert loaded.eos_ids == [2] and "adapter" in loaded.source


def test_f32_logit_tolerance_scales_with_the_logits():
    """f32 exports: 1e-4, or 1e-5 of the largest reference logit (merge rounding grows with
    the logits); a diff far beyond rounding still fails at any scale."""
    from sft_torch.export import f32_tolerance

    assert f32_tolerance({"max_abs_logit": 2.0}) == 1e-4
    assert f32_tolerance({"max_abs_logit": 30.0}) == pytest.approx(3e-4)
    assert 1.1e-4 < f32_tolerance({"max_abs_logit": 30.0})  # SmolLM2's correct demo merge
    assert not 1e-2 < f32_tolerance({"max_abs_logit": 300.0})
