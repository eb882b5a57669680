"""GGUF export of the tiny llama/qwen2 models: every dtype writes, reads back and matches.

$ .venvs/core/bin/python -m pytest tests/plugins/gguf -q      # no torch needed
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from sft.export import ExportRequest, run_export

from tests.plugins.gguf.helpers import llama_rope_rows, load_source
from tests.tiny import CHATML

DTYPES = ["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
WEIGHT_TYPE = {d: d.upper() for d in DTYPES}
MAX_DIFF = {"f16": 1e-4, "bf16": 1e-3, "q8_0": 2e-3, "q5_1": 6e-3, "q5_0": 1.2e-2}
MAX_DIFF.update({"q4_1": 1.2e-2, "q4_0": 2.4e-2})
"""|diff| of the tiny models' N(0, 0.02) weights: about a step of each type over 3.5 sigma."""


def export(model_dir: Path, out: Path, dtype: str):
    return run_export("gguf", ExportRequest(run_dir=model_dir, out=out, dtype=dtype))


def field(reader: gguf.GGUFReader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request, tiny_llama, tiny_qwen2) -> Path:
    return {"llama": tiny_llama, "qwen2": tiny_qwen2}[request.param]


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_exports_and_reads_back_within_tolerance(tiny_model, tmp_path, dtype):
    report = export(tiny_model, tmp_path, dtype)
    assert report.ok and report.checks["problems"] == []
    path = Path(report.path)
    assert path.name == f"{tiny_model.name}-{dtype}.gguf" and path.is_file()
    source = load_source(tiny_model)
    assert report.checks["tensors_compared"] == len(source)
    # Norms and biases stay F32; every 2-D weight takes the file's type, except that the 4- and
    # 5-bit types keep the output matrix in Q8_0.
    n_2d = sum(1 for t in source.values() if t.ndim == 2)
    low_bit = dtype in ("q5_1", "q5_0", "q4_1", "q4_0")
    types = report.checks["tensor_types"]
    if dtype == "f32":
        assert types == {"F32": len(source)}
    else:
        assert types[WEIGHT_TYPE[dtype]] == n_2d - low_bit
        assert types["F32"] == len(source) - n_2d
        assert types.get("Q8_0", 0) == (n_2d if dtype == "q8_0" else int(low_bit))
    assert report.checks["max_abs_diff"]["F32"] == 0.0
    if dtype != "f32":
        diff = report.checks["max_abs_diff"][WEIGHT_TYPE[dtype]]
        assert 0.0 < diff < MAX_DIFF[dtype]
    assert json.loads((tmp_path / "export-gguf.json").read_text())["ok"] is True


def test_f32_tensors_are_the_source_bits_in_llama_cpp_layout(tiny_llama, tiny_qwen2, tmp_path):
    """Checked with gguf's reader and a hand-written permutation, not the plugin's verifier."""
    for model, permuted in ((tiny_llama, True), (tiny_qwen2, False)):
        reader = gguf.GGUFReader(export(model, tmp_path / model.name, "f32").path)
        stored = {t.name: np.asarray(t.data) for t in reader.tensors}
        src = load_source(model)
        q, k = (
            src["model.layers.1.self_attn.q_proj.weight"],
            src["model.layers.1.self_attn.k_proj.weight"],
        )
        q_want = q[llama_rope_rows(q.shape[0], 4)] if permuted else q
        k_want = k[llama_rope_rows(k.shape[0], 2)] if permuted else k
        np.testing.assert_array_equal(stored["blk.1.attn_q.weight"], q_want)
        np.testing.assert_array_equal(stored["blk.1.attn_k.weight"], k_want)
        np.testing.assert_array_equal(stored["token_embd.weight"], src["model.embed_tokens.weight"])
        np.testing.assert_array_equal(stored["output.weight"], src["lm_head.weight"])
        if not permuted:  # qwen2's biases are kept, in F32
            np.testing.assert_array_equal(
                stored["blk.0.attn_q.bias"], src["model.layers.0.self_attn.q_proj.bias"]
            )


def test_q8_0_dequantizes_close_to_the_source(tiny_llama, tmp_path):
    reader = gguf.GGUFReader(export(tiny_llama, tmp_path, "q8_0").path)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    values = gguf.quants.dequantize(t.data, t.tensor_type)
    src = load_source(tiny_llama)["model.layers.0.mlp.down_proj.weight"]
    step = np.abs(src).reshape(-1, 32).max(1, keepdims=True) / 127
    assert np.all(np.abs(values - src).reshape(-1, 32) <= 0.6 * step)


@pytest.mark.parametrize("dtype", ["q5_1", "q5_0", "q4_1", "q4_0"])
def test_low_bit_blocks_dequantize_within_one_step(tiny_llama, tmp_path, dtype):
    """Checked with gguf's reader against a step computed here, not the plugin's verifier."""
    reader = gguf.GGUFReader(export(tiny_llama, tmp_path, dtype).path)
    stored = {t.name: t for t in reader.tensors}
    assert stored["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    t = stored["blk.0.ffn_down.weight"]
    assert t.tensor_type.name == dtype.upper()
    values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, 32)
    src = load_source(tiny_llama)["model.layers.0.mlp.down_proj.weight"].reshape(-1, 32)
    bits = int(dtype[1])
    levels = 2**bits - 1
    if dtype.endswith("_1"):  # min + d * q over the block's range
        step = (src.max(1, keepdims=True) - src.min(1, keepdims=True)) / levels
    else:  # d * q, d = largest |value| / 2^(bits-1)
        step = np.abs(src).max(1, keepdims=True) / 2 ** (bits - 1)
    err = np.abs(values - src) / step
    assert err.max() <= 1.01 and np.sqrt((err**2).mean()) < 0.5


def test_hyperparameters_and_tokenizer_metadata(tiny_llama, tiny_qwen2, tmp_path):
    from transformers import AutoTokenizer

    for model, arch in ((tiny_llama, "llama"), (tiny_qwen2, "qwen2")):
        r = gguf.GGUFReader(export(model, tmp_path / arch, "q8_0").path)
        cfg = json.loads((model / "config.json").read_text())
        assert field(r, "general.architecture") == arch
        assert field(r, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
        expected = {
            "context_length": 512,
            "embedding_length": 64,
            "block_count": 2,
            "feed_forward_length": 128,
            "attention.head_count": 4,
            "attention.head_count_kv": 2,
            "vocab_size": cfg["vocab_size"],
        }
        for key, value in expected.items():
            assert field(r, f"{arch}.{key}") == value, key
        assert field(r, f"{arch}.rope.freq_base") == 10000.0
        assert field(r, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
        # llama.cpp's converter writes the rope dimension for llama only
        assert field(r, f"{arch}.rope.dimension_count") == (16 if arch == "llama" else None)

        tok = AutoTokenizer.from_pretrained(str(model))
        tokens = field(r, "tokenizer.ggml.tokens")
        types = field(r, "tokenizer.ggml.token_type")
        assert field(r, "tokenizer.ggml.model") == "gpt2"
        assert field(r, "tokenizer.ggml.pre") == "gpt-2"
        assert len(tokens) == cfg["vocab_size"] == len(types)
        assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        assert types[:3] == [3, 3, 3]  # CONTROL
        assert all(
            tokens[i] == tok.convert_ids_to_tokens(i) and types[i] == 1 for i in range(3, len(tok))
        )
        assert tokens[-1] == f"[PAD{cfg['vocab_size'] - 1}]" and types[-1] == 5  # UNUSED padding
        assert len(field(r, "tokenizer.ggml.merges")) > 0
        assert field(r, "tokenizer.ggml.eos_token_id") == 2 == tok.eos_token_id
        assert field(r, "tokenizer.ggml.padding_token_id") == 0
        assert field(r, "tokenizer.ggml.add_bos_token") is False
        assert field(r, "tokenizer.chat_template") == CHATML


def test_llama_add_prefix_space_is_carried(tiny_llama, tmp_path):
    from tests.plugins.gguf.helpers import copy_model, edit_json

    model = copy_model(tiny_llama, tmp_path / "prefix")
    edit_json(model / "tokenizer_config.json", add_prefix_space=False)
    r = gguf.GGUFReader(export(model, tmp_path / "out", "f16").path)
    assert field(r, "tokenizer.ggml.add_space_prefix") is False


def test_cli_export_uses_the_registered_plugin(tiny_qwen2, tmp_path, capsys):
    from sft.cli import main
    from sft.plugins import get_plugins

    exporter = get_plugins().exporters.get("gguf")
    assert exporter.fn.__module__ == "sft_gguf.plugin" and "GGUF" in exporter.description
    code = main(
        ["export", str(tiny_qwen2), "--format", "gguf", "--dtype", "q8_0", "--out", str(tmp_path)]
    )
    assert code == 0
    assert (tmp_path / f"{tiny_qwen2.name}-q8_0.gguf").is_file()
    assert "(verified)" in capsys.readouterr().out
