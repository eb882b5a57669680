"""GGUF export of real torch-backend runs: LoRA (merged by the `hf` exporter) and full.

$ .venvs/torch/bin/python -m pytest tests/plugins/gguf/test_gguf_torch_runs.py -q
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

pytest.importorskip("torch")

from sft.export import ExportRequest, run_export

from tests.backends.torch.conftest import make_plan, run_train
from tests.plugins.gguf.helpers import load_source

pytestmark = [pytest.mark.torch, pytest.mark.slow]


def test_lora_run_is_merged_then_converted_exactly(tmp_path, tiny_qwen2):
    plan = make_plan(tmp_path, tiny_qwen2, method="lora", train={"max_steps": 3})
    run_train(plan)
    out = tmp_path / "gguf"
    report = run_export("gguf", ExportRequest(run_dir=plan.run_dir, out=out, dtype="f32"))
    assert report.ok, report.checks["problems"]
    assert "merged by the hf exporter" in report.checks["source"]
    assert not (out / ".hf-merged").exists()  # the temporary merged model is cleaned up
    assert report.checks["eos_token"] == "<|im_end|>"

    merged = run_export("hf", ExportRequest(run_dir=plan.run_dir, out=tmp_path / "hf", dtype="f32"))
    src, base = load_source(tmp_path / "hf"), load_source(tiny_qwen2)
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(report.path).tensors}
    changed = [n for n in src if not np.array_equal(src[n], base[n])]
    assert changed, "the adapter changed no weight: this test would prove nothing"
    for n in range(2):
        for hf, gg in (("self_attn.q_proj", "attn_q"), ("mlp.down_proj", "ffn_down")):
            name = f"model.layers.{n}.{hf}.weight"
            np.testing.assert_array_equal(stored[f"blk.{n}.{gg}.weight"], src[name])
    assert merged.ok


def test_full_run_is_converted_from_its_saved_model(tmp_path, tiny_llama):
    plan = make_plan(tmp_path, tiny_llama, method="full", train={"max_steps": 2})
    run_train(plan)
    report = run_export(
        "gguf", ExportRequest(run_dir=plan.run_dir, out=tmp_path / "g", dtype="bf16")
    )
    assert report.ok, report.checks["problems"]
    assert report.checks["source"] == str(plan.run_dir / "final" / "model")  # no merge needed
    assert report.checks["eos_token_id"] == 2
