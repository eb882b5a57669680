"""Tiny, local, deterministic test models: a byte-level BPE tokenizer trained here and random
llama / qwen2 weights written with numpy (so they exist in every environment, torch or not).

    from tests.tiny import make_tokenizer, make_model
    tok_dir = make_tokenizer(tmp_path / "tok")                 # chatml template, <|im_end|> = eos
    model_dir = make_model(tmp_path / "llama", arch="llama")    # config.json + safetensors + tok

Nothing is downloaded. Same inputs give the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Answer briefly and politely.",
    "What is the capital of France? The capital of France is Paris.",
    "Hello! How can I help you today? Tell me a joke about cats.",
    "user assistant system tool function observation human gpt",
    "Translate to German: good morning. Guten Morgen.",
    "1 2 3 4 5 6 7 8 9 10 + - * / = ( ) [ ] { } < > : ; , . ! ?",
    "Write a haiku about the sea. Waves fold into foam, salt wind carries gull voices.",
    "I am a small language model trained for testing fine-tuning code.",
    "Summarize: the meeting moved to Tuesday because the room was booked.",
] * 20


def make_tokenizer(path: str | Path, vocab_size: int = 320, template: str = CHATML) -> Path:
    """Train a byte-level BPE tokenizer on a fixed corpus and save it as an HF tokenizer dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = template
    fast.save_pretrained(str(path))
    return path


def _model_config(arch: str, vocab: int, tok_dir: Path) -> dict:
    spec = json.loads((tok_dir / "tokenizer_config.json").read_text())
    del spec
    cfg = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if arch == "llama":
        cfg.update({"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1})
    else:
        cfg.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": 2})
    return cfg


def make_model(path: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """A random 2-layer `arch` ("llama" or "qwen2") model dir with the tiny tokenizer."""
    from safetensors.numpy import save_file

    path = Path(path)
    tok_dir = make_tokenizer(path)
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
    vocab = max(vocab + len(SPECIAL), 64)
    cfg = _model_config(arch, vocab, tok_dir)
    rng = np.random.default_rng(seed)
    h, i, nh, nkv = cfg["hidden_size"], cfg["intermediate_size"], 4, 2
    hd = h // nh

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    t = {
        "model.embed_tokens.weight": w(vocab, h),
        "model.norm.weight": np.ones(h, np.float32),
        "lm_head.weight": w(vocab, h),
    }
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t[p + "self_attn.q_proj.weight"] = w(nh * hd, h)
        t[p + "self_attn.k_proj.weight"] = w(nkv * hd, h)
        t[p + "self_attn.v_proj.weight"] = w(nkv * hd, h)
        t[p + "self_attn.o_proj.weight"] = w(h, nh * hd)
        if arch == "qwen2":
            t[p + "self_attn.q_proj.bias"] = w(nh * hd)
            t[p + "self_attn.k_proj.bias"] = w(nkv * hd)
            t[p + "self_attn.v_proj.bias"] = w(nkv * hd)
        t[p + "mlp.gate_proj.weight"] = w(i, h)
        t[p + "mlp.up_proj.weight"] = w(i, h)
        t[p + "mlp.down_proj.weight"] = w(h, i)
        t[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": cfg["eos_token_id"]}, indent=2)
    )
    return path
