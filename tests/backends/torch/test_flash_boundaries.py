"""flash_attention_2 with packed rows and micro_batch_size > 1: every sample is its own varlen
sequence (issue #20, item 2).

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_flash_boundaries.py

transformers derives flash-attention varlen boundaries from position ids only for a batch of one
row (`_is_packed_sequence(position_ids, batch_size)` is False for batch_size > 1): a packed
micro-batch of two rows then ran the plain (non-varlen) kernel over whole rows, and every sample
attended to the samples before it in its row. sft now passes `cu_seq_lens_q/k` and
`max_length_q/k` itself. flash-attn needs CUDA, so on CPU the test replays transformers' own
decision (`_flash_attention_forward`: explicit varlen kwargs, else boundaries from position ids
for one row, else whole rows) with transformers' own helpers on the inputs sft hands the model,
and checks the result is exactly the samples. Where flash-attn and a GPU exist, packed = unpacked.
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch
from sft.data.batching import collate
from sft_torch.data import to_device
from sft_torch.loss import LossSettings, batch_loss, model_inputs
from sft_torch.methods import apply_method
from sft_torch.model import load_model

from tests.backends.torch.conftest import make_plan

pytestmark = pytest.mark.torch

VARLEN = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
ROWS = [[0, 1, 2], [3, 4]]  # two packed rows, the second one padded


def flash_sequences(inputs: dict, batch: int, length: int) -> list[tuple[int, int]]:
    """[start, end) in the flattened [batch * length] tokens of each sequence transformers'
    `_flash_attention_forward` (attention_mask None) would run flash attention over."""
    from transformers.modeling_flash_attention_utils import (
        _is_packed_sequence,
        prepare_fa_kwargs_from_position_ids,
    )

    if all(inputs.get(k) is not None for k in VARLEN):
        cu = inputs["cu_seq_lens_q"].tolist()
        assert inputs["cu_seq_lens_k"].tolist() == cu
        longest = max(e - s for s, e in itertools.pairwise(cu))
        assert inputs["max_length_q"] == inputs["max_length_k"] == longest
    elif _is_packed_sequence(inputs["position_ids"], batch):
        (cu, _), _ = prepare_fa_kwargs_from_position_ids(inputs["position_ids"])
        cu = cu.tolist()
    else:  # the plain kernel, causal over each whole row
        cu = [b * length for b in range(batch + 1)]
    return list(itertools.pairwise(cu))


@pytest.fixture(scope="module")
def plan(tmp_path_factory, tiny_llama):
    return make_plan(
        tmp_path_factory.mktemp("flash"), tiny_llama, method="full", n=5, data={"max_seq_len": 128}
    )


def test_flash_varlen_boundaries_are_the_samples(plan):
    cpu = torch.device("cpu")
    lm = load_model(plan, cpu)
    # what `attn_implementation: flash_attention_2` sets (flash-attn itself needs CUDA; only
    # the inputs are built here, nothing runs the kernel)
    lm.config._attn_implementation = "flash_attention_2"
    split = plan.data.train
    batch = to_device(collate(split, ROWS, pad_id=0), cpu)
    B, L = batch["input_ids"].shape
    assert B == 2
    inputs = model_inputs(lm, batch, LossSettings(packed="position_ids"))
    assert "attention_mask" not in inputs  # flash takes boundaries, not a mask

    # the samples, from the data split alone: each sample one sequence, each padding token one
    want = []
    for b, row in enumerate(ROWS):
        t = b * L
        for i in row:
            n = len(split.sample(i)[0])
            want.append((t, t + n))
            t += n
        want += [(p, p + 1) for p in range(t, (b + 1) * L)]
    got = flash_sequences(inputs, B, L)
    assert got == want, f"flash would attend over {got}, the samples are {want}"
    # the same boundaries transformers derives from position ids when the batch is one row
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    (cu, _), (longest, _) = prepare_fa_kwargs_from_position_ids(
        batch["position_ids"].reshape(1, -1)
    )
    assert inputs["cu_seq_lens_q"].tolist() == cu.tolist()
    assert inputs["max_length_q"] == int(longest)
    assert inputs["cu_seq_lens_q"].dtype == torch.int32  # what flash_attn_varlen_func takes


def test_unpacked_rows_keep_the_plain_kernel(plan):
    """Rows of one sample each (right padding only) need no boundaries: causal attention never
    looks forward, so the plain kernel over whole rows is exact and faster."""
    cpu = torch.device("cpu")
    lm = load_model(plan, cpu)
    lm.config._attn_implementation = "flash_attention_2"
    batch = to_device(collate(plan.data.train, [[0], [1]], pad_id=0), cpu)
    inputs = model_inputs(lm, batch, LossSettings(packed="position_ids"))
    assert not any(k in inputs for k in (*VARLEN, "attention_mask"))


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="needs a CUDA GPU and the flash-attn package (flash_attention_2 has no CPU kernel)",
)
def test_flash_packed_equals_unpacked_on_gpu(plan):
    cuda = torch.device("cuda")
    p = plan
    p.options = plan.options.model_copy(
        update={"attn_implementation": "flash_attention_2", "device": "cuda"}
    )
    lm = load_model(p, cuda).to(torch.bfloat16)
    model = apply_method(lm, p.config.method)
    split, settings = p.data.train, LossSettings(packed="position_ids")
    packed = to_device(collate(split, ROWS, pad_id=0), cuda)
    single = to_device(collate(split, [[i] for r in ROWS for i in r], pad_id=0), cuda)
    with torch.no_grad():
        lp, n_p = batch_loss(model, packed, settings)
        lu, n_u = batch_loss(model, single, settings)
        assert n_p == n_u > 0
        assert abs(float(lp) - float(lu)) < 2e-2 * abs(float(lu))
        # control: without the boundaries the samples of a row attend to each other
        leaky = {**packed, "seq_lens": [[sum(r)] for r in packed["seq_lens"]]}
        ll, _ = batch_loss(model, leaky, settings)
        assert abs(float(ll) - float(lu)) > 5e-2 * abs(float(lu))
