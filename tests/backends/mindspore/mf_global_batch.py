"""MindFormers' own global-batch arithmetic applied to YAMLs sft generated (semi-auto parallel,
full_batch, as on Ascend): `BaseTrainer._check_global_batch_size_for_auto_parallel` of the
installed MindFormers, run in a fresh process because it sets MindSpore's auto-parallel context.

    $ python tests/backends/mindspore/mf_global_batch.py a.yaml b.yaml   # prints [gb_a, gb_b]
"""

from __future__ import annotations

import json
import sys

import mindspore as ms
from mindformers import MindFormerConfig
from mindformers.trainer.base_trainer import BaseTrainer


def global_batch(path: str) -> int:
    config = MindFormerConfig(path)
    ms.set_auto_parallel_context(
        parallel_mode="semi_auto_parallel",
        full_batch=True,
        pipeline_stages=config.parallel_config.pipeline_stage,
    )
    trainer = BaseTrainer.__new__(BaseTrainer)  # only the config is needed for this check
    trainer.config = config
    trainer._check_global_batch_size_for_auto_parallel()
    return int(trainer.global_batch_size)


if __name__ == "__main__":
    print(json.dumps([global_batch(p) for p in sys.argv[1:]]))
