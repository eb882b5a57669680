"""An epoch's short last step is filled to MindFormers' static batch shape with filler records
(`sft_mindspore.data`): the filled batch must give MindFormers' per-token loss and every
gradient of the unfilled batch, exactly, so that the step trains what the torch backend's short
step trains. (`test_parity.py` compares whole runs with short steps against torch.)

    $ .venvs/ms/bin/python -m pytest tests/backends/mindspore/test_filler.py
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

pytest.importorskip("mindspore")

from sft_mindspore.data import read_mindrecord
from sft_mindspore.train import prepare

from tests.backends.mindspore.conftest import make_plan, synthetic_split

pytestmark = [pytest.mark.mindspore, pytest.mark.slow]


def loss_and_grads(model_cfg, ckpt, records):
    """MindFormers' training loss (summed token losses / trained tokens, the per-token loss
    the generated YAML asks for) and the gradients of every trainable parameter."""
    import mindspore as ms
    from mindformers.models.build_model import build_network

    model_cfg = copy.deepcopy(model_cfg)  # building consumes the LoRA pet_config
    model_cfg.model_config.batch_size = len(records)
    model_cfg.model_config.calculate_per_token_loss = True
    net = build_network(model_cfg)
    ms.load_param_into_net(net, ms.load_checkpoint(str(ckpt)))
    net.set_train(True)
    params = net.trainable_params()

    def loss_fn(x, y):
        numerator, denominator = net(x, y)
        return numerator / denominator

    x = ms.Tensor(np.stack([r["input_ids"] for r in records]), ms.int32)
    y = ms.Tensor(np.stack([r["labels"] for r in records]), ms.int32)
    loss, grads = ms.value_and_grad(loss_fn, None, params)(x, y)
    return float(loss.asnumpy()), {p.name: g.asnumpy() for p, g in zip(params, grads, strict=True)}


def test_filler_changes_neither_the_loss_nor_any_gradient(tmp_path, tiny_llama):
    import mindspore as ms
    from mindformers import MindFormerConfig

    # 3 samples, micro-batch 2: step 2 holds one real row and one filler record
    plan = make_plan(tmp_path / "run", tiny_llama, "lora", split=synthetic_split(n=3))
    yaml_path, schedule, _ = prepare(plan, "CPU")
    assert schedule.steps[1] and len(schedule.steps[1]) == 1 and schedule.filler_rows == 3
    records = read_mindrecord(plan.run_dir / "mindformers" / "data" / "train.mindrecord")
    real, filler = records[2], records[3]
    assert (filler["labels"] == -100).all()
    cfg = MindFormerConfig(str(yaml_path))
    ckpt = plan.run_dir / "mindformers" / "init" / "model.ckpt"
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    try:
        alone = loss_and_grads(cfg.model, ckpt, [real])
        filled = loss_and_grads(cfg.model, ckpt, [real, filler])
    finally:
        ms.set_context(mode=mode)
    assert filled[0] == alone[0], (filled[0], alone[0])
    assert filled[1].keys() == alone[1].keys() and len(alone[1]) == 2 * 7 * 2  # LoRA A, B
    # B starts at 0, so only the B matrices have a gradient at step 1: real numbers compared
    assert {n for n, g in alone[1].items() if g.any()} == {n for n in alone[1] if "lora_b" in n}
    for name, grad in alone[1].items():
        np.testing.assert_array_equal(filled[1][name], grad, err_msg=name)
