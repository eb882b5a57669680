"""The GGUF verifier catches a damaged file; inputs the exporter cannot handle fail clearly.

$ .venvs/core/bin/python -m pytest tests/plugins/gguf/test_gguf_verify.py -q
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from sft.errors import SftError
from sft.export import ExportRequest, run_export
from sft_gguf.source import read_tensors, resolve_source
from sft_gguf.verify import verify_gguf

from tests.plugins.gguf.helpers import (
    copy_model,
    edit_json,
    load_source,
    to_bf16_bits,
    write_safetensors_raw,
)


def export(model_dir: Path, out: Path, dtype: str):
    return run_export("gguf", ExportRequest(run_dir=model_dir, out=out, dtype=dtype))


def corrupt_tensor(path: Path, name: str, index: int = 0, delta: int = 1) -> None:
    """Change one stored value of tensor `name` in place (Q8_0: one int8 quant; Q4_0: the low
    nibble of byte `index`, the 4-bit quant of value `index`, moved by `delta` steps mod 16)."""
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == name)
    offset = t.data_offset
    with open(path, "r+b") as f:
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            f.seek(offset + 4 * index)
            value = np.frombuffer(f.read(4), np.float32)[0]
            f.seek(offset + 4 * index)
            f.write(np.float32(value + delta * 1e-3).tobytes())
        elif t.tensor_type == gguf.GGMLQuantizationType.Q4_0:  # f16 scale, 16 bytes of nibbles
            f.seek(offset + 2 + index)
            b = f.read(1)[0]
            f.seek(offset + 2 + index)
            f.write(bytes([(b & 0xF0) | ((b + delta) & 0x0F)]))
        else:  # Q8_0 block: 2-byte f16 scale, then 32 int8 quants
            f.seek(offset + 2 + index)
            q = np.frombuffer(f.read(1), np.int8)[0]
            f.seek(offset + 2 + index)
            f.write(np.int8(np.clip(int(q) + delta, -127, 127)).tobytes())


@pytest.mark.parametrize(
    "dtype,name,delta",
    [
        ("f32", "blk.1.ffn_up.weight", 1),
        ("q8_0", "blk.0.attn_v.weight", 40),
        ("q4_0", "blk.1.ffn_gate.weight", 8),
    ],
)
def test_a_tensor_changed_after_writing_fails_verification(
    tiny_llama, tmp_path, dtype, name, delta
):
    path = Path(export(tiny_llama, tmp_path, dtype).path)
    corrupt_tensor(path, name, index=5, delta=delta)
    checks, problems = verify_gguf(path, tiny_llama, dtype)
    assert len(problems) == 1 and name in problems[0] and "1 values out of tolerance" in problems[0]
    assert checks["by_type"][dtype.upper()]["max_diff_over_tolerance"] > 1


def test_changed_metadata_fails_verification(tiny_qwen2, tmp_path):
    path = Path(export(tiny_qwen2, tmp_path, "f16").path)
    editable = gguf.GGUFReader(path, "r+")  # gguf-py edits scalar fields in place
    editable.fields["tokenizer.ggml.eos_token_id"].parts[-1][0] = 1
    editable.fields["qwen2.block_count"].parts[-1][0] = 3
    del editable
    _, problems = verify_gguf(path, tiny_qwen2, "f16")
    assert any("eos_token_id" in p for p in problems)
    assert any("qwen2.block_count is 3" in p for p in problems)


def test_vocab_size_disagreeing_with_the_embeddings_fails(tiny_llama, tmp_path):
    model = copy_model(tiny_llama, tmp_path / "bigger-vocab")
    edit_json(model / "config.json", vocab_size=400)  # the embedding keeps its 323 rows
    with pytest.raises(SftError, match="token_embd has 323 rows but vocab_size is 400"):
        export(model, tmp_path / "out", "f16")


def test_run_export_raises_when_the_written_file_disagrees(tiny_llama, tmp_path, monkeypatch):
    import sft_gguf.writer as writer

    real_write = writer.write_gguf

    def write_then_damage(model_dir, out_path, dtype, name=""):  # a disk/writer fault, injected
        result = real_write(model_dir, out_path, dtype, name)
        corrupt_tensor(out_path, "blk.0.ffn_gate.weight")
        return result

    monkeypatch.setattr(writer, "write_gguf", write_then_damage)
    with pytest.raises(SftError, match="failed its verification"):
        export(tiny_llama, tmp_path, "f32")


def test_bf16_sharded_source_is_widened_exactly(tiny_llama, tmp_path):
    """A bf16 checkpoint in two shards: read with numpy alone, F32 export holds the exact values."""
    model = copy_model(tiny_llama, tmp_path / "bf16-model")
    src = load_source(tiny_llama)
    (model / "model.safetensors").unlink()
    names = sorted(src)
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = {n: ("BF16", to_bf16_bits(src[n])) for n in part}
        write_safetensors_raw(model / f"model-0000{i + 1}-of-00002.safetensors", shard)
    widened = read_tensors(model)
    bits = to_bf16_bits(src["lm_head.weight"]).astype(np.uint32) << 16
    np.testing.assert_array_equal(widened["lm_head.weight"], bits.view(np.float32))
    report = export(model, tmp_path / "out", "f32")
    assert report.ok and report.checks["tensors_compared"] == len(src)
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(report.path).tensors}
    np.testing.assert_array_equal(stored["output.weight"], bits.view(np.float32))


@pytest.mark.parametrize("final", ["final/model", "final"])  # "final": a run of sft 0.1.0 (torch)
def test_full_finetuning_run_dir_uses_the_saved_model(tiny_llama, tmp_path, final):
    run = tmp_path / "my-run"
    copy_model(tiny_llama, run / final)
    (run / "config.yaml").write_text("model: {name_or_path: tiny}\n")
    report = export(run, tmp_path / "out", "q8_0")
    assert report.ok and report.checks["source"] == str(run / final)
    assert Path(report.path).name == "my-run-q8_0.gguf"


def test_lora_run_without_the_hf_exporter_says_what_to_install(tmp_path, monkeypatch):
    from sft.plugins import reset_plugins

    monkeypatch.setenv("SFT_DISABLE_PLUGIN_AUTOLOAD", "1")  # no torch backend, so no `hf`
    reset_plugins()
    run = tmp_path / "lora-run"
    (run / "final" / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("method: lora\n")
    with pytest.raises(SftError, match="pip install -e backends/torch"):
        resolve_source(run, tmp_path / "out")


def test_user_mistakes_raise_clear_errors(tiny_llama, tmp_path):
    with pytest.raises(SftError, match=r"f32, f16, bf16, q8_0, q5_1, .*, q6_k, not 'q4_k'"):
        export(tiny_llama, tmp_path / "a", "q4_k")
    with pytest.raises(SftError, match="neither a Hugging Face model directory"):
        export(tmp_path / "nothing-here", tmp_path / "b", "f16")
    gpt2 = copy_model(tiny_llama, tmp_path / "gpt2-like")
    edit_json(gpt2 / "config.json", model_type="gpt2")
    with pytest.raises(
        SftError, match="supports model_type llama, mistral, qwen2, qwen3, not 'gpt2'"
    ):
        export(gpt2, tmp_path / "c", "f16")
    scaled = copy_model(tiny_llama, tmp_path / "yarn")
    edit_json(scaled / "config.json", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(SftError, match="rope scaling 'yarn'"):
        export(scaled, tmp_path / "d", "f16")
    no_eps = copy_model(tiny_llama, tmp_path / "no-eps")
    cfg = json.loads((no_eps / "config.json").read_text())
    del cfg["rms_norm_eps"]
    (no_eps / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SftError, match=r"config\.json of this llama model lacks rms_norm_eps"):
        export(no_eps, tmp_path / "e", "f16")


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is not None, reason="llama-cpp-python is installed"
)
def test_k_quants_without_llama_cpp_name_the_install(tiny_llama, tmp_path):
    """No llama.cpp here (.venvs/core): the export and the run config both say what to install."""
    import yaml
    from sft.config import load_config
    from sft.errors import ConfigError

    with pytest.raises(SftError, match=r'q4_k_m .*pip install "llama-cpp-python==0\.3\.36"'):
        export(tiny_llama, tmp_path / "out", "q4_k_m")
    assert not list((tmp_path / "out").glob("*.gguf*"))
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    job = tmp_path / "job.yaml"
    export_spec = {"formats": ["gguf"], "dtype": "q6_k"}
    job.write_text(
        yaml.safe_dump(
            {"backend": "example", "data": {"train": "train.jsonl"}, "export": export_spec}
        )
    )
    with pytest.raises(ConfigError, match=r"export\.dtype: GGUF q6_k .*llama-cpp-python"):
        load_config(job, [])
