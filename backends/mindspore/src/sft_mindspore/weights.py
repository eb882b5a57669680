"""Weights between Hugging Face safetensors and MindSpore `.ckpt` (MindFormers' legacy llama names).

Works for llama and qwen2 (qwen2 is MindFormers' LlamaForCausalLM with `qkv_has_bias: True`).
The names differ only by a rename table: no transpose, no RoPE permutation. Safetensors go
through core's numpy reader/writer (`sft.safetensors_io`) byte-for-byte (bf16 travels as its raw
16 bits, widened exactly to float32 only when it must become a MindSpore tensor): a round trip
HF -> ckpt -> HF is bit-exact.

    $ sft convert weights --to ckpt  path/to/hf-model  model.ckpt
    $ sft convert weights --to hf    model.ckpt  hf-out/  --config-from path/to/hf-model
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from sft.errors import ConfigError, Problem, SftError
from sft.safetensors_io import DTYPES, Tensor, read_dir, write_file

# (HF pattern, MindFormers replacement); applied to the part after "model.layers.N." or whole.
_RULES = [
    (r"^model\.embed_tokens\.weight$", "model.tok_embeddings.embedding_weight"),
    (r"^model\.norm\.weight$", "model.norm_out.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.", r"model.layers.\1.attention.w\2."),
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.", r"model.layers.\1.feed_forward.w1."),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"model.layers.\1.feed_forward.w2."),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.", r"model.layers.\1.feed_forward.w3."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"model.layers.\1.attention_norm."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"model.layers.\1.ffn_norm."),
]
_REVERSE = [
    (r"^model\.tok_embeddings\.embedding_weight$", "model.embed_tokens.weight"),
    (r"^model\.norm_out\.weight$", "model.norm.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (r"^model\.layers\.(\d+)\.attention\.w([qkvo])\.", r"model.layers.\1.self_attn.\2_proj."),
    (r"^model\.layers\.(\d+)\.feed_forward\.w1\.", r"model.layers.\1.mlp.gate_proj."),
    (r"^model\.layers\.(\d+)\.feed_forward\.w2\.", r"model.layers.\1.mlp.down_proj."),
    (r"^model\.layers\.(\d+)\.feed_forward\.w3\.", r"model.layers.\1.mlp.up_proj."),
    (r"^model\.layers\.(\d+)\.attention_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^model\.layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
]
#: HF module name -> MindFormers cell name, for LoRA targets.
MODULE_MAP = {
    "q_proj": "wq",
    "k_proj": "wk",
    "v_proj": "wv",
    "o_proj": "wo",
    "gate_proj": "w1",
    "down_proj": "w2",
    "up_proj": "w3",
}
SUPPORTED = ("llama", "qwen2")
_LINEAR = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+))\.weight$")


def _rename(name: str, rules: list[tuple[str, str]]) -> str:
    for pat, rep in rules:
        new, n = re.subn(pat, rep, name)
        if n:
            return new
    raise SftError(f"weight {name!r} has no MindFormers/HF counterpart; supported: {SUPPORTED}")


def hf_to_ms_name(name: str) -> str:
    return _rename(name, _RULES)


def ms_to_hf_name(name: str) -> str:
    return _rename(name, _REVERSE)


def is_model_weight(name: str) -> bool:
    """A MindFormers name of the model (or a LoRA delta), not training state such as
    `adam_m.*`, `global_step`, `scale_sense` or `global_batch_size`."""
    if name.startswith(("adam_m.", "adam_v.", "accu_grads.")):
        return False
    base = re.sub(r"\.mindpet_delta_lora_[ab]$", ".weight", name)
    return any(re.match(pat, base) for pat, _ in _REVERSE)


def check_model_type(model_dir: str | Path) -> dict[str, Any]:
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.exists():
        raise SftError(f"{model_dir}: no config.json; give a Hugging Face model directory")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") not in SUPPORTED:
        raise SftError(
            f"{model_dir}: model_type {cfg.get('model_type')!r} is not supported by "
            f"the MindSpore backend (MindFormers legacy llama): use one of {SUPPORTED}"
        )
    return cfg


# ------------------------------------------------------------------------------- ckpt


def _ms_dtype(st_dtype: str) -> Any:
    import mindspore as ms

    return {
        "F32": ms.float32,
        "F16": ms.float16,
        "BF16": ms.bfloat16,
        "F64": ms.float64,
        "I64": ms.int64,
        "I32": ms.int32,
    }[st_dtype]


def to_ms_tensor(t: Tensor) -> Any:
    import mindspore as ms

    if t.dtype == "BF16":  # exact: f32 holding a bf16 value casts back without rounding
        return ms.Tensor(t.to_float32(), dtype=ms.bfloat16)
    return ms.Tensor(t.data, dtype=_ms_dtype(t.dtype))


def from_ms_tensor(value: Any) -> Tensor:
    import mindspore as ms

    if value.dtype == ms.bfloat16:
        bits = value.astype(ms.float32).asnumpy().view(np.uint32) >> 16
        return Tensor(bits.astype(np.uint16), "BF16")
    arr = value.asnumpy()
    inverse = {np.dtype(v): k for k, v in DTYPES.items() if k != "BF16"}
    return Tensor(arr, inverse[arr.dtype])


def save_ckpt(tensors: dict[str, Tensor], path: str | Path) -> Path:
    """Write MindFormers-named tensors as a MindSpore checkpoint."""
    import mindspore as ms

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ms.save_checkpoint(
        [{"name": k, "data": to_ms_tensor(v)} for k, v in tensors.items()], str(path)
    )
    return path


def load_ckpt(path: str | Path, drop_state: bool = True) -> dict[str, Tensor]:
    """A MindSpore checkpoint as raw tensors (optimizer and step state dropped by default)."""
    import mindspore as ms

    params = ms.load_checkpoint(str(path))
    return {k: from_ms_tensor(v) for k, v in params.items() if not drop_state or is_model_weight(k)}


def hf_to_ckpt(model_dir: str | Path, out: str | Path, lora: Any = None, seed: int = 0) -> Path:
    """HF safetensors directory -> one `.ckpt` with MindFormers names. With `lora` (the spec's
    LoRA method) the checkpoint also holds the starting adapters (`lora_init_tensors`), which
    MindFormers loads into mindpet's cells instead of drawing its own."""
    check_model_type(model_dir)
    hf = read_dir(model_dir)
    tensors = {hf_to_ms_name(k): v for k, v in hf.items()}
    if lora is not None:
        tensors.update(lora_init_tensors(hf, lora, seed))
    return save_ckpt(tensors, out)


def lora_target_names(target_modules: str | list[str]) -> list[str]:
    """The spec's `method.target_modules` as the HF module names (q_proj ...) that have a
    MindFormers counterpart; a ConfigError when some or all cannot be honoured."""
    if target_modules == "all-linear":
        return list(MODULE_MAP)
    if isinstance(target_modules, list):
        unknown = [m for m in target_modules if m not in MODULE_MAP]
        if unknown:
            raise ConfigError(
                [
                    Problem(
                        "method.target_modules",
                        f"{unknown} have no MindFormers counterpart; use names from "
                        f"{sorted(MODULE_MAP)}",
                    )
                ]
            )
        return list(target_modules)
    # a regex over HF names: keep the modules whose HF name it matches
    names = [hf for hf in MODULE_MAP if re.search(target_modules, hf)]
    if not names:
        raise ConfigError(
            [
                Problem(
                    "method.target_modules",
                    f"regex {target_modules!r} matches none of {sorted(MODULE_MAP)}",
                )
            ]
        )
    return names


def lora_init_tensors(hf: dict[str, Tensor], lora: Any, seed: int) -> dict[str, Tensor]:
    """mindpet's `<cell>.mindpet_delta_lora_a` / `_b` for every targeted linear of the model:
    A from core's seeded draw (`sft.lora_init`, the same matrices the torch backend gives peft),
    B zero. Float32, as mindpet's LoRA parameters are."""
    from sft.lora_init import lora_a

    targets = set(lora_target_names(lora.target_modules))
    out: dict[str, Tensor] = {}
    for name, t in hf.items():
        m = _LINEAR.match(name)
        if m is None or m[2] not in targets:
            continue
        out_features, in_features = t.data.shape
        cell = hf_to_ms_name(name).removesuffix(".weight")
        a = lora_a(seed, m[1], lora.r, in_features)
        out[f"{cell}.mindpet_delta_lora_a"] = Tensor(a, "F32")
        out[f"{cell}.mindpet_delta_lora_b"] = Tensor(
            np.zeros((out_features, lora.r), np.float32), "F32"
        )
    return out


def ckpt_to_hf(ckpt: str | Path, out_dir: str | Path, config_from: str | Path | None) -> Path:
    """`.ckpt` (full model, MindFormers names) -> HF safetensors directory. `config_from` is the
    HF directory whose config.json / tokenizer files are copied beside the weights."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = load_ckpt(ckpt)
    lora = [k for k in tensors if "mindpet_delta" in k]
    if lora:
        raise SftError(
            f"{ckpt} holds LoRA weights ({lora[0]} ...): export the run with "
            "`sft export RUN_DIR --format hf` (merges them) instead"
        )
    write_file({ms_to_hf_name(k): v for k, v in tensors.items()}, out_dir / "model.safetensors")
    if config_from:
        copy_model_files(config_from, out_dir)
    return out_dir


def copy_model_files(src: str | Path, dst: str | Path) -> None:
    """config.json, generation config and tokenizer files (never weights, never an adapter)."""
    for f in Path(src).iterdir():
        if (
            f.is_file()
            and not f.name.endswith((".safetensors", ".bin", ".ckpt", ".index.json"))
            and f.name not in ("adapter_config.json",)
        ):
            shutil.copy2(f, Path(dst) / f.name)
