"""The starting LoRA adapters of a run, drawn once without a framework so that every backend
trains from the same weights for the same `train.seed`.

peft's default initialisation, drawn with numpy instead of each framework's own RNG: A is
kaiming-uniform with a = sqrt(5) over fan_in = in_features, i.e. uniform(-1/sqrt(in), 1/sqrt(in)),
and B is zero (so the adapted model starts equal to the base). The torch backend copies these A
matrices into peft's `lora_A` after `get_peft_model`; the MindSpore backend writes them into the
checkpoint MindFormers starts from (mindpet's `mindpet_delta_lora_a`).

    a = lora_a(seed=42, module="model.layers.0.self_attn.q_proj", r=8, in_features=64)
    a.shape, a.dtype   # (8, 64) float32

A module's draw depends only on (seed, its Hugging Face module name, r, in_features), never on the
order in which a backend visits its modules.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np


def lora_a(seed: int, module: str, r: int, in_features: int) -> np.ndarray:
    """LoRA A [r, in_features] float32 of `module` (HF name, e.g. model.layers.0.mlp.up_proj)."""
    name_key = int.from_bytes(hashlib.sha256(module.encode()).digest()[:8], "little")
    entropy = [seed & 0xFFFFFFFFFFFFFFFF, name_key, r, in_features]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
    bound = 1.0 / math.sqrt(in_features)
    return rng.uniform(-bound, bound, size=(r, in_features)).astype(np.float32)
