"""HF safetensors <-> MindSpore ckpt: names, bit-exact round trips (f32 and bf16), the
`sft convert weights` command and the verified `ckpt` exporter (full model and merged adapter).

    $ .venvs/ms/bin/python -m pytest tests/backends/mindspore/test_weights.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mindspore")

from sft.cli import main
from sft.errors import SftError
from sft.export import ExportRequest, run_export
from sft.safetensors_io import Tensor, read_dir, read_file, write_file
from sft_mindspore.weights import (
    ckpt_to_hf,
    hf_to_ckpt,
    hf_to_ms_name,
    load_ckpt,
    ms_to_hf_name,
)

pytestmark = pytest.mark.mindspore


def test_name_map_follows_mindformers_legacy_llama():
    assert hf_to_ms_name("model.embed_tokens.weight") == "model.tok_embeddings.embedding_weight"
    assert (
        hf_to_ms_name("model.layers.3.self_attn.k_proj.bias") == "model.layers.3.attention.wk.bias"
    )
    assert (
        hf_to_ms_name("model.layers.0.mlp.gate_proj.weight")
        == "model.layers.0.feed_forward.w1.weight"
    )
    assert (
        hf_to_ms_name("model.layers.0.mlp.down_proj.weight")
        == "model.layers.0.feed_forward.w2.weight"
    )
    assert (
        hf_to_ms_name("model.layers.1.post_attention_layernorm.weight")
        == "model.layers.1.ffn_norm.weight"
    )
    assert hf_to_ms_name("model.norm.weight") == "model.norm_out.weight"
    for name in (
        "lm_head.weight",
        "model.layers.7.mlp.up_proj.weight",
        "model.layers.2.input_layernorm.weight",
    ):
        assert ms_to_hf_name(hf_to_ms_name(name)) == name
    with pytest.raises(SftError, match="no MindFormers/HF counterpart"):
        hf_to_ms_name("model.layers.0.block_sparse_moe.gate.weight")


def _assert_same_dir(a: Path, b: Path) -> None:
    ta, tb = read_dir(a), read_dir(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and np.array_equal(ta[k].data, tb[k].data), k


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_ckpt_hf_round_trip_is_bit_exact(arch, request, tmp_path):
    model = request.getfixturevalue(f"tiny_{arch}")
    ckpt = hf_to_ckpt(model, tmp_path / "m.ckpt")
    names = set(load_ckpt(ckpt))
    assert "model.tok_embeddings.embedding_weight" in names
    assert ("model.layers.0.attention.wq.bias" in names) == (arch == "qwen2")
    back = ckpt_to_hf(ckpt, tmp_path / "hf", config_from=model)
    _assert_same_dir(model, back)
    assert (back / "config.json").is_file() and (back / "tokenizer.json").is_file()


def _bf16_copy(model: Path, out: Path) -> Path:
    """The tiny model with every float tensor rounded to bfloat16 (raw bits, like torch saves)."""
    out.mkdir()
    tensors = read_file(model / "model.safetensors")
    rng = np.random.default_rng(1)
    bf16 = {}
    for k, t in tensors.items():
        bits = t.to_float32() + rng.standard_normal(t.data.shape).astype(np.float32) * 1e-3
        bf16[k] = Tensor((bits.view(np.uint32) >> 16).astype(np.uint16), "BF16")
    write_file(bf16, out / "model.safetensors")
    cfg = json.loads((model / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}))
    return out


def test_bf16_round_trip_is_bit_exact_through_the_cli(tiny_qwen2, tmp_path, capsys):
    src = _bf16_copy(tiny_qwen2, tmp_path / "bf16")
    assert main(["convert", "weights", "--to", "ckpt", str(src), str(tmp_path / "w.ckpt")]) == 0
    import mindspore as ms

    params = ms.load_checkpoint(str(tmp_path / "w.ckpt"))
    assert params["model.norm_out.weight"].dtype == ms.bfloat16
    assert (
        main(
            [
                "convert",
                "weights",
                "--to",
                "hf",
                str(tmp_path / "w.ckpt"),
                str(tmp_path / "out"),
                "--config-from",
                str(src),
            ]
        )
        == 0
    )
    _assert_same_dir(src, tmp_path / "out")
    assert main(["convert", "weights", "--to", "gguf", str(src), str(tmp_path / "x")]) != 0
    assert "use `ckpt`" in capsys.readouterr().err


def test_ckpt_exporter_verifies_a_plain_hf_dir(tiny_llama, tmp_path):
    report = run_export("ckpt", ExportRequest(run_dir=tiny_llama, out=tmp_path, dtype="f32"))
    assert report.ok and report.checks["bit_exact"]
    assert report.checks["tensors_compared"] == len(read_dir(tiny_llama))
    f16 = run_export("ckpt", ExportRequest(run_dir=tiny_llama, out=tmp_path / "h", dtype="f16"))
    assert f16.ok and load_ckpt(Path(f16.path))["lm_head.weight"].dtype == "F16"


def _peft_run(model: Path, run: Path) -> tuple[dict, float]:
    """A run dir whose final/adapter holds a PEFT adapter (random A and B, alpha 16, r 4)."""
    adapter = run / "final" / "adapter"
    adapter.mkdir(parents=True)
    rng = np.random.default_rng(3)
    w = read_dir(model)
    tensors = {}
    for layer in range(2):
        mod = f"model.layers.{layer}.self_attn.v_proj"
        out_dim, in_dim = w[mod + ".weight"].data.shape
        tensors[f"base_model.model.{mod}.lora_A.weight"] = Tensor(
            rng.standard_normal((4, in_dim)).astype(np.float32), "F32"
        )
        tensors[f"base_model.model.{mod}.lora_B.weight"] = Tensor(
            rng.standard_normal((out_dim, 4)).astype(np.float32), "F32"
        )
    write_file(tensors, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 4,
                "lora_alpha": 16,
                "base_model_name_or_path": str(model),
                "target_modules": ["v_proj"],
            }
        )
    )
    return tensors, 16 / 4


def test_ckpt_exporter_merges_a_peft_adapter(tiny_qwen2, tmp_path):
    tensors, scale = _peft_run(tiny_qwen2, tmp_path / "run")
    report = run_export(
        "ckpt", ExportRequest(run_dir=tmp_path / "run", out=tmp_path / "out", dtype="f32")
    )
    assert report.ok and report.checks["adapter_merged"]
    got = load_ckpt(Path(report.path))
    base = read_dir(tiny_qwen2)
    mod = "model.layers.1.self_attn.v_proj"
    a = tensors[f"base_model.model.{mod}.lora_A.weight"].data
    b = tensors[f"base_model.model.{mod}.lora_B.weight"].data
    expected = base[mod + ".weight"].data + scale * (b @ a)
    np.testing.assert_allclose(got["model.layers.1.attention.wv.weight"].data, expected, rtol=1e-6)
    untouched = "model.layers.1.attention.wq.weight"
    assert np.array_equal(got[untouched].data, base["model.layers.1.self_attn.q_proj.weight"].data)


def test_ckpt_exporter_names_what_it_needs(tmp_path):
    with pytest.raises(SftError, match="no HF model"):
        run_export("ckpt", ExportRequest(run_dir=tmp_path, out=tmp_path / "o", dtype="f32"))
    with pytest.raises(SftError, match="takes"):
        run_export("ckpt", ExportRequest(run_dir=tmp_path, out=tmp_path / "o", dtype="q8_0"))
