"""Core's framework-free LoRA A draw (`sft.lora_init`): peft's default distribution, a pure function
of (seed, module name, shape), so both backends start from the same adapters (issue #22).

    $ .venvs/core/bin/python -m pytest tests/core/test_lora_init.py
"""

from __future__ import annotations

import math

import numpy as np
from sft.lora_init import lora_a


def test_kaiming_uniform_a_sqrt5_bound_and_shape():
    a = lora_a(42, "model.layers.0.self_attn.q_proj", r=16, in_features=576)
    assert a.shape == (16, 576) and a.dtype == np.float32
    bound = 1 / math.sqrt(576)  # gain sqrt(2 / (1 + 5)) x sqrt(3 / fan_in)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
    assert abs(float(a.mean())) < 0.05 * bound  # uniform around 0
    assert abs(float(a.std()) - bound / math.sqrt(3)) < 0.03 * bound


def test_a_pure_function_of_seed_module_and_shape():
    q0 = lora_a(7, "model.layers.0.self_attn.q_proj", 8, 64)
    assert np.array_equal(q0, lora_a(7, "model.layers.0.self_attn.q_proj", 8, 64))
    for other in (
        lora_a(8, "model.layers.0.self_attn.q_proj", 8, 64),  # seed
        lora_a(7, "model.layers.1.self_attn.q_proj", 8, 64),  # module
        lora_a(7, "model.layers.0.self_attn.k_proj", 8, 64),
    ):
        assert not np.allclose(q0, other)
    assert lora_a(-1, "m", 2, 4).shape == (2, 4)  # any int seed
