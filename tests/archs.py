"""Tiny random models of every decoder-only architecture in the matrix, built from transformers'
own config classes with each architecture's quirks kept (tied embeddings, q/k norm, sliding
window, soft-capping, MoE), plus the tiny tokenizer of tests/tiny.py. Nothing is downloaded.

    from tests.archs import ARCHS, build
    model_dir = build(tmp_path / "gemma2", "gemma2")   # config.json + safetensors + tokenizer

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_archs.py

The architecture list and the statuses the docs show live in `sft.archs` (core); this module
holds only what is needed to build the models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft.archs import ARCHITECTURES

from tests.tiny import SPECIAL, make_tokenizer

COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "attention_dropout": 0.0,
    "initializer_range": 0.2,  # larger than real models' so LoRA/freeze changes show in losses
}

# Each architecture's own quirks on top of COMMON (values chosen so the quirk engages on a
# 64-token packed row: a sliding window shorter than a row, soft-capping that clips).
QUIRKS: dict[str, dict[str, Any]] = {
    "llama": {
        "tie_word_embeddings": False,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"tie_word_embeddings": True, "head_dim": 16},  # q/k norm
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
        "norm_topk_prob": True,
    },
    "mistral": {"sliding_window": 4},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "gemma": {"head_dim": 16},
    "gemma2": {
        "head_dim": 16,
        "sliding_window": 4,
        "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 3.0,
        "query_pre_attn_scalar": 16,
    },
    "gemma3_text": {
        "head_dim": 16,
        "sliding_window": 4,
        "query_pre_attn_scalar": 16,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "phi3": {"tie_word_embeddings": False, "pad_token_id": 0},
    "olmo2": {},
    "granite": {
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.2,
        "logits_scaling": 2.0,
    },
    "smollm3": {"no_rope_layer_interval": 2, "tie_word_embeddings": True},
    "cohere2": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "glm4": {"head_dim": 16},
    "deepseek_v3": {
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": 24,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "num_key_value_heads": 4,
        "rope_scaling": None,
    },
}


def vocab_size(tok_dir: Path) -> int:
    import json

    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    return max(len(vocab) + len(SPECIAL), 64)


def make_config(model_type: str, vocab: int) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=vocab, **{**COMMON, **QUIRKS[model_type]})


def build(path: str | Path, model_type: str, seed: int = 0) -> Path:
    """A random 2-layer `model_type` model dir (fp32 safetensors) with the tiny chat tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tok_dir = make_tokenizer(path)
    cfg = make_config(model_type, vocab_size(tok_dir))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(str(path))
    return path


assert set(QUIRKS) == set(ARCHITECTURES), "tests/archs.py and sft.archs list the same archs"
