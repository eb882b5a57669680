"""sft's MindFormers YAML for llama2-7b LoRA (8 cards) and qwen2.5-7b full fine-tuning (8 cards,
2 nodes x 8) against MindFormers' own reference finetune configs, key by key: every difference
must be listed with its reason in golden/comparison.yaml, and every listed one must still differ.

$ .venvs/ms/bin/python -m pytest tests/backends/mindspore/test_golden_configs.py
"""

from __future__ import annotations

import pytest
import yaml

pytest.importorskip("mindspore")

from tests.backends.mindspore.golden_cases import CASES, GOLDEN, differences

pytestmark = pytest.mark.mindspore

COMPARISON = yaml.safe_load((GOLDEN / "comparison.yaml").read_text())


def _listed(case: str) -> dict[str, str]:
    return {**COMPARISON["common"], **COMPARISON["cases"][case]}


def _covers(pattern: str, key: str) -> bool:
    return key.startswith(pattern[:-1]) if pattern.endswith(".*") else key == pattern


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_difference_from_mindformers_reference_is_explained(case, tmp_path):
    diff = differences(case, tmp_path)
    listed = _listed(case)
    unexplained = {k: v for k, v in diff.items() if not any(_covers(p, k) for p in listed)}
    assert not unexplained, (
        f"{case}: keys that differ from {CASES[case][1]} without a reason in comparison.yaml "
        "(match MindFormers or explain): "
        + "; ".join(f"{k}: reference {a!r}, sft {b!r}" for k, (a, b) in unexplained.items())
    )
    stale = [p for p in listed if not any(_covers(p, k) for k in diff)]
    assert not stale, f"{case}: listed in comparison.yaml but equal now: {stale}"


def test_the_cases_agree_where_mindformers_sets_the_essentials(tmp_path):
    """The keys a wrong value would silently break, equal to the reference in every case."""
    for case in CASES:
        diff = differences(case, tmp_path / case)
        for key in (
            "parallel.parallel_mode",
            "parallel.full_batch",
            "parallel.gradients_mean",
            "parallel.enable_parallel_optimizer",
            "parallel_config.model_parallel",
            "parallel_config.pipeline_stage",
            "runner_config.batch_size",
            "runner_config.sink_mode",
            "model.model_config.seq_length",
            "model.model_config.compute_dtype",
            "model.model_config.num_layers",
            "model.model_config.hidden_size",
            "model.arch.type",
        ):
            assert key not in diff, (case, key, diff.get(key))
    assert "parallel_config.micro_batch_num" not in differences("qwen2.5-7b-full-8cards", tmp_path)
