"""The exported GGUF in a real llama.cpp (llama-cpp-python): same tokens, same logits, it chats.

Skipped unless `llama_cpp` is importable (it compiles llama.cpp: ~10+ minutes on 2 cores, so CI
does not install it). To run it by hand, see docs/gguf.md:

    $ /tmp/llamacpp-venv/bin/python -m pytest tests/plugins/gguf/test_gguf_llamacpp.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sft.export import ExportRequest, run_export

from tests.plugins.gguf.helpers import load_source, reference_logits
from tests.tiny import CHATML

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in 3 words."}]


def load(path: str):
    # F32 KV cache (type 0): llama.cpp's default F16 cache alone costs ~1e-4 on these logits
    return llama_cpp.Llama(
        model_path=path,
        n_ctx=128,
        n_batch=128,
        n_threads=1,
        logits_all=True,
        verbose=False,
        type_k=0,
        type_v=0,
    )


# Measured: f32 1.1e-7, f16 3.7e-4, q8_0 7.1e-3 (logits have std 0.16). Leaving out llama's q/k
# permutation moves f32 by 5.8e-3, so the f32/f16 cases would catch a wrong layout.
@pytest.mark.parametrize(
    "arch,dtype,atol",
    [
        ("llama", "f32", 1e-5),
        ("qwen2", "f32", 1e-5),
        ("qwen2", "f16", 1e-3),
        ("llama", "q8_0", 2e-2),
    ],
)
def test_llama_cpp_tokenizes_and_computes_like_the_hf_model(
    arch, dtype, atol, tiny_llama, tiny_qwen2, tmp_path
):
    from transformers import AutoTokenizer

    model = {"llama": tiny_llama, "qwen2": tiny_qwen2}[arch]
    llm = load(run_export("gguf", ExportRequest(model, tmp_path, dtype)).path)
    tok = AutoTokenizer.from_pretrained(str(model))
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False).input_ids
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    assert llm.metadata["tokenizer.chat_template"] == CHATML
    assert llm.token_eos() == tok.eos_token_id
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    cfg = json.loads((Path(model) / "config.json").read_text())
    want = reference_logits(load_source(model), cfg, ids)
    # rope layout, GQA, biases and every weight must line up for this to hold at every position
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def test_llama_cpp_chats_with_the_exported_template(tiny_llama, tmp_path):
    llm = load(run_export("gguf", ExportRequest(tiny_llama, tmp_path, "q8_0")).path)
    out = llm.create_chat_completion(CHAT, max_tokens=8, temperature=0.0)
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["usage"]["prompt_tokens"] > 10 and out["usage"]["completion_tokens"] >= 1
