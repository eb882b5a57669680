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


HF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
"""GGUF tensor names (llama.cpp's llama/qwen2) -> HF names, written out here independently."""


def gguf_weights(path: Path, cfg: dict) -> dict[str, np.ndarray]:
    """The weights a GGUF file holds, dequantized by gguf-py, as HF-named HF-layout arrays."""
    import gguf

    out: dict[str, np.ndarray] = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        value = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        stem, _, kind = t.name.rpartition(".")
        if stem.startswith("blk."):
            _, n, part = stem.split(".")
            name = f"model.layers.{n}.{HF_NAMES[part]}.{kind}"
            heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
            if cfg["model_type"] == "llama" and part in heads:
                unpermuted = np.empty_like(value)
                unpermuted[llama_rope_rows(value.shape[0], heads[part])] = value
                value = unpermuted
        else:
            name = f"{HF_NAMES[stem]}.{kind}"
        out[name] = value
    if "lm_head.weight" not in out:  # tied: llama.cpp multiplies with the embeddings
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def widen_model(src: Path, dst: Path, hidden: int = 256, seed: int = 1) -> Path:
    """A copy of a tiny model with rows of 256 (k-quant super-blocks), new random weights."""
    from safetensors.numpy import save_file

    dst = copy_model(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit_json(dst / "config.json", hidden_size=hidden, intermediate_size=2 * hidden)
    rng = np.random.default_rng(seed)
    shapes = {k: v.shape for k, v in load_source(src).items()}
    old_h, old_i = cfg["hidden_size"], cfg["intermediate_size"]
    scale = {old_h: hidden, old_i: 2 * hidden, old_h // 2: hidden // 2}

    def resized(shape: tuple[int, ...]) -> tuple[int, ...]:
        # vocab stays; hidden, intermediate and the kv width (2 of 4 heads) grow
        return tuple(d if d == cfg["vocab_size"] else scale[d] for d in shape)

    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(resized(shape), np.float32)
        else:
            tensors[name] = (rng.standard_normal(resized(shape)) * 0.02).astype(np.float32)
    for f in dst.glob("model*.safetensors"):
        f.unlink()
    save_file(tensors, str(dst / "model.safetensors"))
    return dst
