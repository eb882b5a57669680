"""Test helpers for the GGUF plugin: independent readers and a numpy reference forward pass.

Nothing here imports sft_gguf: these are the yardsticks the plugin is measured against.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np


def load_source(model_dir: Path) -> dict[str, np.ndarray]:
    """The tiny models are float32 safetensors: read them with the safetensors package."""
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(model_dir.glob("model*.safetensors")):
        out.update(load_file(str(f)))
    return out


def llama_rope_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp expects for q/k: per head, row 2i+j is HF row j*hd/2+i."""
    hd = n_rows // n_head
    order = [
        h * hd + j * (hd // 2) + i for h in range(n_head) for i in range(hd // 2) for j in (0, 1)
    ]
    return np.array(order)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (round to nearest even), as torch would store them."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def write_safetensors_raw(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """Write safetensors by hand (dtype tag, raw array) so BF16 needs no torch."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def reference_logits(t: dict[str, np.ndarray], cfg: dict, ids: list[int]) -> np.ndarray:
    """HF llama/qwen2 forward pass in float64 numpy (rotate-half rope, GQA, SwiGLU)."""
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["hidden_size"] // nh
    eps = cfg["rms_norm_eps"]
    g = {k: v.astype(np.float64) for k, v in t.items()}
    x = g["model.embed_tokens.weight"][ids]
    pos = np.arange(len(ids))[:, None] * (1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd))
    cos, sin = np.cos(np.concatenate([pos, pos], 1)), np.sin(np.concatenate([pos, pos], 1))
    mask = np.triu(np.full((len(ids), len(ids)), -np.inf), 1)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        h = _rms(x, g[p + "input_layernorm.weight"], eps)
        q, k, v = (
            h @ g[p + f"self_attn.{w}_proj.weight"].T + g.get(p + f"self_attn.{w}_proj.bias", 0)
            for w in "qkv"
        )
        q, k = (_rope(z.reshape(len(ids), -1, hd), cos, sin) for z in (q, k))
        v = v.reshape(len(ids), -1, hd)
        k, v = (np.repeat(z, nh // nkv, axis=1) for z in (k, v))
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = (
            x
            + np.einsum("hqk,khd->qhd", a, v).reshape(len(ids), -1)
            @ g[p + "self_attn.o_proj.weight"].T
        )
        h = _rms(x, g[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ g[p + "mlp.gate_proj.weight"].T, h @ g[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ g[p + "mlp.down_proj.weight"].T
    return _rms(x, g["model.norm.weight"], eps) @ g["lm_head.weight"].T


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(z: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = z.shape[-1] // 2
    rotated = np.concatenate([-z[..., half:], z[..., :half]], -1)
    return z * cos[:, None, :] + rotated * sin[:, None, :]
