"""The supported architectures (llama, mistral, qwen2, qwen3): GGUF hyperparameters and tensor names/layout.

Everything here follows llama.cpp's `convert_hf_to_gguf.py` (LlamaModel, Qwen2Model, TextModel):
the same `{arch}.*` keys from the same config.json fields, tensor names through gguf-py's
`TensorNameMap`, and llama's q/k row permutation (llama.cpp's llama graph applies rope to
interleaved pairs, HF to halves; qwen2 uses the NEOX rope and needs none).

    >>> spec = arch_spec(cfg)                    # cfg = config.json as a dict
    >>> hparams(cfg, spec, dtype="q8_0")         # [(key, value, "u32" | "f32"), ...]
    >>> to_gguf_layout("model.layers.0.self_attn.q_proj.weight", w, cfg, spec)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
from sft.errors import SftError

FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
}
"""`--dtype` -> general.file_type."""

SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")
"""Buffers llama.cpp's converter drops: they are recomputed at run time."""


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    arch: gguf.MODEL_ARCH
    permute_qk: bool
    """llama: q/k rows are permuted for llama.cpp's rope; qwen2: no."""
    rope_dimension_count: bool
    """llama writes `{arch}.rope.dimension_count`; qwen2's converter does not."""

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


_LLAMA = ArchSpec("llama", gguf.MODEL_ARCH.LLAMA, permute_qk=True, rope_dimension_count=True)

ARCHS = {
    "llama": _LLAMA,
    # llama.cpp's converter writes Mistral as llama (MistralForCausalLM -> LlamaModel)
    "mistral": _LLAMA,
    "qwen2": ArchSpec("qwen2", gguf.MODEL_ARCH.QWEN2, permute_qk=False, rope_dimension_count=False),
    # Qwen3Model(Qwen2Model): qwen2's keys and layout plus per-head q/k norms (plain renames)
    "qwen3": ArchSpec("qwen3", gguf.MODEL_ARCH.QWEN3, permute_qk=False, rope_dimension_count=False),
}
"""config.json `model_type` -> spec. Only architectures whose llama.cpp conversion is a plain
rename of every tensor (plus llama's q/k permutation) with llama's hyperparameters; the others
are in REFUSED with the reason."""

REQUIRED = (
    "num_hidden_layers",
    "max_position_embeddings",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "vocab_size",
    "rms_norm_eps",
)
"""config.json keys every supported architecture's GGUF header is written from."""

REFUSED = {
    "qwen3_moe": "llama.cpp stacks the experts into one tensor per layer",
    "mixtral": "llama.cpp stacks the experts into one tensor per layer",
    "deepseek_v3": "llama.cpp stacks the experts and splits kv_b_proj",
    "gemma": "llama.cpp stores the norm weights as 1 + w",
    "gemma2": "llama.cpp stores the norm weights as 1 + w (and soft-capping keys)",
    "gemma3_text": "llama.cpp stores the norm weights as 1 + w (and sliding-window keys)",
    "phi3": "llama.cpp needs rope-factor tensors and sliding-window keys for phi3",
    "olmo2": "llama.cpp's olmo2 graph needs its own post-norm tensor names",
    "granite": "llama.cpp needs granite's embedding/residual/attention/logit scale keys",
    "smollm3": "llama.cpp needs smollm3's no-rope layer keys",
    "cohere2": "llama.cpp needs cohere2's sliding-window and logit-scale keys",
    "glm4": "llama.cpp splits glm4's fused gate_up_proj",
}
"""Architectures gguf-py knows whose conversion is more than a rename: refused, with why."""


def arch_spec(cfg: dict[str, Any]) -> ArchSpec:
    """The spec for config.json's `model_type` (architectures may be missing after a GGUF load)."""
    model_type = cfg.get("model_type")
    if model_type not in ARCHS:
        why = f": {REFUSED[model_type]}" if model_type in REFUSED else ""
        raise SftError(
            f"GGUF export supports model_type {', '.join(sorted(ARCHS))}, not {model_type!r} "
            f"(config.json){why}; use llama.cpp's convert_hf_to_gguf.py on the merged model "
            "(`sft export RUN_DIR --format hf`)"
        )
    missing = [k for k in REQUIRED if cfg.get(k) is None]
    if missing:
        raise SftError(
            f"config.json of this {model_type} model lacks {', '.join(missing)}, which the GGUF "
            "header needs (llama.cpp's converter reads the same keys); add them to the model's "
            "config.json (transformers writes them all when it saves the model)"
        )
    return ARCHS[model_type]


def head_counts(cfg: dict[str, Any]) -> tuple[int, int]:
    n_head = int(cfg["num_attention_heads"])
    return n_head, int(cfg.get("num_key_value_heads") or n_head)


def hparams(cfg: dict[str, Any], spec: ArchSpec, dtype: str) -> list[tuple[str, Any, str]]:
    """The `{arch}.*` and `general.file_type` entries, in the converter's order, with GGUF types."""
    a = spec.name
    k = gguf.Keys.LLM
    n_head, n_head_kv = head_counts(cfg)
    out: list[tuple[str, Any, str]] = [
        (k.BLOCK_COUNT.format(arch=a), int(cfg["num_hidden_layers"]), "u32"),
        (k.CONTEXT_LENGTH.format(arch=a), int(cfg["max_position_embeddings"]), "u32"),
        (k.EMBEDDING_LENGTH.format(arch=a), int(cfg["hidden_size"]), "u32"),
        (k.FEED_FORWARD_LENGTH.format(arch=a), int(cfg["intermediate_size"]), "u32"),
        (gguf.Keys.Attention.HEAD_COUNT.format(arch=a), n_head, "u32"),
        (gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=a), n_head_kv, "u32"),
    ]
    if cfg.get("rope_theta") is not None:
        out.append((gguf.Keys.Rope.FREQ_BASE.format(arch=a), float(cfg["rope_theta"]), "f32"))
    eps = float(cfg["rms_norm_eps"])
    out.append((gguf.Keys.Attention.LAYERNORM_RMS_EPS.format(arch=a), eps, "f32"))
    if cfg.get("head_dim") is not None:
        out.append((gguf.Keys.Attention.KEY_LENGTH.format(arch=a), int(cfg["head_dim"]), "u32"))
        out.append((gguf.Keys.Attention.VALUE_LENGTH.format(arch=a), int(cfg["head_dim"]), "u32"))
    out.append((gguf.Keys.General.FILE_TYPE, int(FILE_TYPES[dtype]), "u32"))
    # llama.cpp's converter writes vocab_size for llama only; llama.cpp reads it for any arch,
    # so qwen2 files carry it too (it equals the token list length, which is checked).
    out.append((k.VOCAB_SIZE.format(arch=a), int(cfg["vocab_size"]), "u32"))
    if spec.rope_dimension_count:
        rope_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // n_head
        out.append((gguf.Keys.Rope.DIMENSION_COUNT.format(arch=a), int(rope_dim), "u32"))
    return out


def check_unsupported_features(cfg: dict[str, Any]) -> None:
    """Refuse what this exporter would silently get wrong (rope scaling types it doesn't write)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = (
        rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else None
    )
    window = cfg.get("sliding_window")
    if window and cfg.get("use_sliding_window", True) and window < cfg["max_position_embeddings"]:
        raise SftError(
            f"config.json has sliding_window: {window}, which llama.cpp's "
            f"{cfg.get('model_type')} graph does not apply (it would attend further back than "
            "the model was trained to); use llama.cpp's convert_hf_to_gguf.py on the merged model"
        )
    if rope_type not in (None, "default"):
        raise SftError(
            f"config.json asks for rope scaling {rope_type!r}, which this GGUF exporter does not "
            "write; use llama.cpp's convert_hf_to_gguf.py on the merged model instead"
        )


def gguf_name(hf_name: str, tensor_map: gguf.TensorNameMap) -> str:
    """The GGUF tensor name for an HF tensor name (model.layers.3.mlp.up_proj.weight -> ...)."""
    name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise SftError(
            f"tensor {hf_name!r} has no GGUF name for this architecture; the model has parts "
            "llama.cpp's graph for this architecture does not know, so it cannot be exported to GGUF"
        )
    return name


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp's order: per head, interleave the two rope halves."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute` (used by verification to compare with the HF tensor)."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def qk_heads(hf_name: str, cfg: dict[str, Any], spec: ArchSpec) -> int | None:
    """How many heads a permuted tensor is split into (None: this tensor is not permuted)."""
    if not spec.permute_qk:
        return None
    n_head, n_head_kv = head_counts(cfg)
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return n_head
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return n_head_kv
    return None


def to_gguf_layout(hf_name: str, w: np.ndarray, cfg: dict[str, Any], spec: ArchSpec) -> np.ndarray:
    heads = qk_heads(hf_name, cfg, spec)
    return w if heads is None else permute(w, heads)


def from_gguf_layout(
    hf_name: str, w: np.ndarray, cfg: dict[str, Any], spec: ArchSpec
) -> np.ndarray:
    heads = qk_heads(hf_name, cfg, spec)
    return w if heads is None else unpermute(w, heads)
