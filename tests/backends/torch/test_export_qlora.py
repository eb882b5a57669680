"""The QLoRA `hf` export (issue #20, item 8): the adapter is merged into dequant(quant(W)), the
weights it was trained against, not into the original base. bitsandbytes and a GPU are not
here, so the quantization round trip is a stand-in (blockwise 4-bit absmax) passed to the same
code that calls `bitsandbytes.functional.dequantize_4bit` through peft on a GPU; what runs for
real is which weights are replaced, the merge, and the refusal without bitsandbytes.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_export_qlora.py -q
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from sft.errors import SftError
from sft.export import ExportRequest, run_export
from sft_torch.export import dequantized_weights, logits_of, on_dequantized_base, probe_batch
from sft_torch.generate import find_run_weights, load_base
from transformers import AutoTokenizer

from tests.backends.torch.conftest import make_plan, run_train

pytestmark = pytest.mark.torch


class Params4bit(torch.nn.Parameter):
    """Named like bitsandbytes' 4-bit parameter, which is how peft recognizes one."""


def roundtrip_4bit(w: torch.Tensor, state: object = None, block: int = 64) -> torch.Tensor:
    """dequant(quant(w)) of a blockwise absmax 4-bit code (15 levels per block)."""
    flat = w.detach().float().reshape(-1, block)
    scale = flat.abs().amax(1, keepdim=True) / 7
    return (torch.round(flat / scale) * scale).reshape(w.shape)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    tmp = tmp_path_factory.mktemp("qlora-run")
    plan = make_plan(tmp, tiny_llama, method="lora", train={"max_steps": 3})
    run_train(plan)
    return plan.run_dir


def quantized_like_training(model_dir: Path) -> torch.nn.Module:
    """The base as transformers' bitsandbytes integration leaves it: every Linear but the
    output head holds a Params4bit."""
    base = load_base(model_dir)
    head = base.get_output_embeddings()
    for mod in base.modules():
        if isinstance(mod, torch.nn.Linear) and mod is not head:
            mod.weight = Params4bit(mod.weight.detach().clone(), requires_grad=False)
    return base


def test_merge_goes_into_the_dequantized_weights(lora_run: Path, tiny_llama: Path) -> None:
    run = find_run_weights(lora_run)
    deq = dequantized_weights(quantized_like_training(tiny_llama), dequantize=roundtrip_4bit)
    assert len(deq) == 2 * 7 and "lm_head" not in deq  # 2 layers x q,k,v,o,gate,up,down
    seqs = probe_batch(AutoTokenizer.from_pretrained(str(run.weights)))
    trained = on_dequantized_base(run, deq)  # what the adapter computed with while training
    want = logits_of(trained, seqs)
    merged = logits_of(on_dequantized_base(run, deq).merge_and_unload(), seqs)
    assert max(float((a - b).abs().max()) for a, b in zip(want, merged, strict=True)) < 1e-4
    # the old export: the adapter merged into the original weights, a different model
    from peft import PeftModel

    naive = PeftModel.from_pretrained(load_base(tiny_llama), str(run.weights)).merge_and_unload()
    got = logits_of(naive, seqs)
    assert max(float((a - b).abs().max()) for a, b in zip(want, got, strict=True)) > 1e-3


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available(),
    reason="bitsandbytes and a GPU are here: the real export runs (gpu_check)",
)
def test_qlora_hf_export_without_bitsandbytes_is_refused(lora_run: Path, tmp_path: Path) -> None:
    """Without bitsandbytes + CUDA the quantized weights cannot be rebuilt: refuse, instead of
    exporting the adapter merged into the wrong weights as before."""
    cfg_path = lora_run / "config.yaml"  # what `sft run` writes beside final/; a QLoRA method
    cfg_path.write_text(yaml.safe_dump({"method": {"name": "qlora", "bits": 4}}))
    try:
        with pytest.raises(SftError, match=r"QLoRA run.*bitsandbytes and a CUDA GPU"):
            run_export("hf", ExportRequest(run_dir=lora_run, out=tmp_path / "hf", dtype="f32"))
    finally:
        cfg_path.unlink()
