"""The lr MindFormers is configured with is sft's schedule at every optimizer step, for every
`lr_scheduler`, warmup and final-lr setting (issue #22). The YAML's `lr_schedule` is built through
MindFormers' own registry (`build_lr`, as its trainer does) and evaluated at each 0-based global
step, exactly what MindFormers' train step passes it; `test_parity.py` checks the lr logged by
real runs against the same function.

    $ .venvs/ms/bin/python -m pytest tests/backends/mindspore/test_parity_schedule.py
"""

from __future__ import annotations

import pytest

pytest.importorskip("mindspore")

import mindspore as ms
from sft.lr import learning_rates
from sft.specs import TrainSpec
from sft_mindspore.mfconfig import lr_schedule

pytestmark = pytest.mark.mindspore

TABLE = [
    # lr_scheduler, total steps, warmup_steps, warmup_ratio, min_lr_ratio
    (kind, total, warmup, ratio, min_ratio)
    for kind in ("cosine", "linear", "constant")
    for total, warmup, ratio, min_ratio in [
        (1, 0, 0.0, 0.0),
        (2, None, 0.5, 0.0),
        (5, 2, 0.0, 0.0),
        (10, 3, 0.0, 0.1),
        (10, None, 0.03, 0.0),  # ceil(0.3) = 1 warmup step
        (37, None, 0.1, 0.05),
        (6, 9, 0.0, 0.0),  # more warmup steps than steps: capped, as torch caps them
    ]
]


@pytest.fixture(scope="module", autouse=True)
def _graph_mode_cpu():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


@pytest.mark.parametrize(("kind", "total", "warmup", "ratio", "min_ratio"), TABLE)
def test_mindformers_lr_equals_sft_schedule_at_every_step(kind, total, warmup, ratio, min_ratio):
    import sft_mindspore.lr  # noqa: F401  registers the class, as the worker script does
    from mindformers.core.lr import build_lr
    from mindformers.tools.register import MindFormerConfig

    train = TrainSpec(
        learning_rate=3e-4,
        lr_scheduler=kind,
        warmup_steps=warmup,
        warmup_ratio=ratio,
        min_lr_ratio=min_ratio,
    )
    schedule = build_lr(MindFormerConfig(**lr_schedule(train, total)))
    got = [float(schedule(ms.Tensor([s], ms.int32)).asnumpy().reshape(())) for s in range(total)]
    want = learning_rates(train, total)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-12), (got, want)


def test_first_step_trains_at_a_nonzero_lr():
    # MindFormers' own CosineWithWarmUpLR gives 0 at global step 0 (the bug of issue #22)
    train = TrainSpec(learning_rate=1e-3, warmup_steps=2)
    assert lr_schedule(train, 10)["type"] == "SftWarmUpDecayLR"
    assert learning_rates(train, 10)[:3] == [5e-4, 1e-3, 1e-3]
