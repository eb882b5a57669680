"""`packed_attention: segments` builds no [B, 1, L, L] mask (issue #20, item 10).

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_segments_mask.py

The per-sample attention (sft_torch.attention) finds the samples in the position ids and never
reads a mask, yet transformers built sdpa's block-diagonal mask for every forward through the
mask function registered for it (268 MB at B = 4, L = 8k). The mask function now returns None
for a pass over whole rows; a layer that falls back to sdpa (sliding window, soft-capping ...)
builds the samples' mask itself, so packed still equals unpacked there.
"""

from __future__ import annotations

import pytest
import torch
from sft.data.batching import collate
from sft_torch import attention
from sft_torch.data import to_device
from sft_torch.loss import LossSettings, batch_loss
from sft_torch.methods import apply_method
from sft_torch.model import causal_lm, load_model

from tests.backends.torch.conftest import make_plan

pytestmark = pytest.mark.torch
CPU = torch.device("cpu")
ROWS = [[0, 1, 2], [3, 4]]  # two packed rows, the second one padded


@pytest.fixture(scope="module")
def plan(tmp_path_factory, tiny_qwen2):
    return make_plan(
        tmp_path_factory.mktemp("seg"), tiny_qwen2, method="full", n=5, data={"max_seq_len": 128}
    )


@pytest.fixture
def segments_model(plan):
    lm = load_model(plan, CPU)
    assert attention.resolve(lm, "segments", "sdpa", packing=True) == "segments"
    model = apply_method(lm, plan.config.method)
    model.train()
    return model


@pytest.fixture
def mask_calls(monkeypatch):
    """What the mask function registered for the segments attention returns, per call (it is
    called through transformers' registry; the recorder calls the registered one)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    attention.register()
    registered = ALL_MASK_ATTENTION_FUNCTIONS[attention.NAME]
    returned: list = []

    def recorder(*args, **kwargs):
        out = registered(*args, **kwargs)
        returned.append(out)
        return out

    ALL_MASK_ATTENTION_FUNCTIONS.register(attention.NAME, recorder)
    yield returned
    ALL_MASK_ATTENTION_FUNCTIONS.register(attention.NAME, registered)


def loss(model, rows, plan):
    batch = to_device(collate(plan.data.train, rows, pad_id=0), CPU)
    out, n = batch_loss(model, batch, LossSettings(packed="segments"))
    out.backward()
    return float(out), n


def test_no_mask_is_built_for_a_packed_training_pass(plan, segments_model, mask_calls):
    loss(segments_model, ROWS, plan)
    assert mask_calls, "transformers did not ask for a mask at all"
    shapes = [tuple(m.shape) for m in mask_calls if m is not None]
    assert shapes == [], f"masks built on the segments path: {shapes}"


def test_layers_that_fall_back_get_the_samples_mask(plan, segments_model, mask_calls):
    """A sliding window sends every layer to sdpa's fallback; the window is wider than any row,
    so the result must be exactly the per-sample one, and packed must equal unpacked."""
    lm = causal_lm(segments_model)
    per_sample, _ = loss(segments_model, ROWS, plan)
    for mod in lm.modules():
        if hasattr(mod, "is_causal") and hasattr(mod, "q_proj"):
            mod.sliding_window = 1024
    packed, n = loss(segments_model, ROWS, plan)
    unpacked, n_u = loss(segments_model, [[i] for r in ROWS for i in r], plan)
    assert n == n_u > 0
    assert all(m is None for m in mask_calls)
    assert packed == pytest.approx(unpacked, rel=1e-5)
    assert packed == pytest.approx(per_sample, rel=1e-5)
