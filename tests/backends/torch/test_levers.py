"""The speed levers are decided once (`sft_torch.levers.resolve_levers`): the training loop
applies and reports them, and `sft bench` prints them as the loop reported them.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_levers.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from sft_torch import levers as levers_module
from sft_torch.bench import run_bench
from sft_torch.levers import resolve_levers

from tests.backends.torch.conftest import make_plan
from tests.backends.torch.test_bench import write_config

pytestmark = pytest.mark.torch


def test_single_process_levers_stay_off_where_the_strategy_replaces_parameters(
    tmp_path: Path, tiny_llama: Path
) -> None:
    """bf16 frozen weights and fused LoRA change the model's parameters: with FSDP they would
    give it mixed dtypes and Linears it cannot shard, so several processes turn them off (DDP
    only wraps the model, so fused LoRA stays); fast dropout is a CPU kernel."""
    on = {"fused_lora": True, "bf16_frozen_weights": True, "fast_dropout": True}
    fsdp = make_plan(
        tmp_path / "fsdp",
        tiny_llama,
        torch_opts=on,
        parallel={"nproc_per_node": 2, "strategy": "fsdp"},
    )
    ddp = make_plan(tmp_path / "ddp", tiny_llama, torch_opts=on, parallel={"nproc_per_node": 2})
    cpu = torch.device("cpu")
    one = resolve_levers(fsdp, cpu, "bf16", world=1)
    assert one.bf16_frozen_weights and one.fused_lora and one.fast_dropout
    two = resolve_levers(fsdp, cpu, "bf16", world=2)
    assert not two.bf16_frozen_weights and not two.fused_lora
    assert resolve_levers(ddp, cpu, "bf16", world=2).fused_lora
    assert not resolve_levers(fsdp, cpu, "fp32", world=1).bf16_frozen_weights  # no bf16 compute
    assert not resolve_levers(fsdp, torch.device("cuda"), "bf16", world=1).fast_dropout


def test_threads_are_the_option_else_torch_default_capped_at_physical_cores(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu = torch.device("cpu")
    plan = make_plan(tmp_path / "set", tiny_llama, torch_opts={"num_threads": 3})
    assert resolve_levers(plan, cpu, "fp32", 1).threads == 3
    auto = make_plan(tmp_path / "auto", tiny_llama)
    try:
        for torch_default, cores, want in [(2, 1, 1), (1, 4, 1), (3, 4, 3)]:
            monkeypatch.setattr(levers_module, "physical_cores", lambda c=cores: c)
            torch.set_num_threads(torch_default)  # 2 on 1 core: hyper-threads
            assert resolve_levers(auto, cpu, "fp32", 1).threads == want
    finally:
        torch.set_num_threads(1)


@pytest.mark.slow
def test_bench_reports_the_levers_the_loop_applied(tmp_path: Path, tiny_llama: Path) -> None:
    """A model whose logits are not head(hidden) (soft-capped) trains with the full-logits loss
    although torch.chunked_loss is on, and `auto` attention is a real kernel: the bench says
    what the loop did (it used to print the options: chunked_loss true, attn 'auto')."""
    model = tmp_path / "softcapped"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 30.0}))
    result = run_bench(write_config(tmp_path, model), steps=2, probe_seconds=0.02)
    levers = result["levers"]
    assert levers["chunked_loss"] is False and levers["fused_loss"] is False
    assert levers["attn_implementation"] == "sdpa"
    assert levers["packed_attention"] in ("segments", "position_ids")
    assert result["threads"] == 1  # torch.num_threads: 1 in write_config
