"""The parts of multi-process training that need no processes: the DeepSpeed JSON generated
from the spec, the torchrun command line, and how a global step is split over ranks.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_distributed_config.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from sft.errors import SftError  # noqa: E402
from sft.specs import RunConfig  # noqa: E402
from sft_torch import distributed, launch  # noqa: E402
from sft_torch.deepspeed import ds_config  # noqa: E402
from sft_torch.options import TorchOptions  # noqa: E402
from sft_torch.strategy import wrap_model  # noqa: E402

pytestmark = pytest.mark.torch


def spec(**parallel: object) -> RunConfig:
    return RunConfig.model_validate(
        {
            "data": {"train": "x.jsonl"},
            "train": {"micro_batch_size": 2, "global_batch_size": 32, "max_grad_norm": 0.5},
            "parallel": {"nproc_per_node": 4, **parallel},
        }
    )


def test_zero2_config_from_the_spec() -> None:
    cfg = ds_config(spec(strategy="zero2"), accumulation=4, world=4, precision="bf16")
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 32  # = the spec's global batch
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["fp16"]["enabled"] is False
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 2
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    json.dumps(cfg)  # plain JSON


def test_zero3_with_cpu_offload_offloads_optimizer_and_parameters() -> None:
    cfg = ds_config(spec(strategy="zero3", cpu_offload=True), 4, 4, "fp16")
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert cfg["fp16"]["enabled"] is True and cfg["bf16"]["enabled"] is False


def test_zero2_offload_moves_only_the_optimizer() -> None:
    zero = ds_config(spec(strategy="zero2", cpu_offload=True), 4, 4, "fp32")["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and "offload_param" not in zero


def test_no_clipping_is_zero_in_deepspeed() -> None:
    config = spec(strategy="zero2")
    config.train.max_grad_norm = None
    assert ds_config(config, 4, 4, "fp32")["gradient_clipping"] == 0.0


def test_user_json_gets_auto_values_from_the_spec(tmp_path: Path) -> None:
    user = {
        "train_micro_batch_size_per_gpu": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "sub_group_size": 1e9},
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    cfg = ds_config(spec(strategy="zero3", deepspeed_config=str(path)), 4, 4, "bf16")
    assert cfg["zero_optimization"] == user["zero_optimization"]  # theirs, untouched
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["train_batch_size"] == 32
    assert cfg["bf16"]["enabled"] is True


def test_user_json_that_contradicts_the_spec_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    with pytest.raises(SftError, match="train_batch_size=64 \\(spec: 32\\)"):
        ds_config(spec(strategy="zero2", deepspeed_config=str(path)), 4, 4, "fp32")


def test_user_json_missing_or_broken(tmp_path: Path) -> None:
    with pytest.raises(SftError, match="does not exist"):
        ds_config(spec(strategy="zero2", deepspeed_config=str(tmp_path / "no.json")), 4, 4, "fp32")
    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 2")
    with pytest.raises(SftError, match="not valid JSON"):
        ds_config(spec(strategy="zero2", deepspeed_config=str(bad)), 4, 4, "fp32")


def plan_for(config: RunConfig, tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(config=config, run_dir=tmp_path)


def test_torchrun_command_single_node_uses_a_free_port(tmp_path: Path) -> None:
    args = launch.torchrun_args(plan_for(spec(), tmp_path), tmp_path / "logs")
    assert "--nproc_per_node=4" in args and "--nnodes=1" in args and "--standalone" in args
    assert "--max_restarts=0" in args
    assert args[-5:] == ["-m", "sft", "run", "--config", str(tmp_path / "launch-config.yaml")]


def test_torchrun_command_multi_node_names_the_rendezvous(tmp_path: Path) -> None:
    config = spec(nnodes=2, node_rank=1, master_addr="10.0.0.7", master_port=29123)
    args = launch.torchrun_args(plan_for(config, tmp_path), tmp_path / "logs")
    assert {"--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.7", "--master_port=29123"} <= set(
        args
    )
    assert "--standalone" not in args


def test_worker_config_reloads_to_the_same_spec(tmp_path: Path) -> None:
    from sft.config import load_config

    (tmp_path / "x.jsonl").write_text('{"text": "hi"}\n')
    original = load_config(
        None,
        [f"data.train={tmp_path / 'x.jsonl'}", "parallel.nproc_per_node=2", "torch.device=cpu"],
    )
    path = launch.worker_config(plan_for(original, tmp_path))
    again = load_config(path)
    assert again.model_dump(exclude={"output_dir"}) == original.model_dump(exclude={"output_dir"})
    assert again.data.train[0].model_fields_set == original.data.train[0].model_fields_set
    assert again.output_dir == str(tmp_path)


def schedule(rank: int, world: int = 2, micro: int = 2) -> SimpleNamespace:
    return SimpleNamespace(rank=rank, world=world, micro_batch_size=micro)


def test_ranks_split_a_step_and_pad_to_the_same_count() -> None:
    rows = [[i] for i in range(5)]  # a short last step: 5 rows over 2 ranks, micro-batch 2
    r0 = distributed.rank_micro_batches(schedule(0), rows)
    r1 = distributed.rank_micro_batches(schedule(1), rows)
    assert r0 == [([[0], [2]], 1.0), ([[4]], 1.0)]
    assert r1 == [([[1], [3]], 1.0), ([[1], [3]], 0.0)]  # weight-0 copy: same count
    # every row is trained exactly once over all ranks
    real = sorted(i for mbs in (r0, r1) for mb, w in mbs if w for row in mb for i in row)
    assert real == list(range(5))


def test_a_rank_without_rows_still_runs_one_weightless_micro_batch() -> None:
    assert distributed.rank_micro_batches(schedule(1), [[7]]) == [([[7]], 0.0)]


def test_world_size_must_match_the_spec() -> None:
    plan = SimpleNamespace(config=spec())  # 4 processes
    distributed.check_world(plan, 4)
    with pytest.raises(SftError, match="torchrun started 2 processes"):
        distributed.check_world(plan, 2)


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ("ddp", "DDP keeps a whole replica"),
        ("fsdp", "this run trains on the CPU"),
        ("zero2", "this run trains on the CPU"),
    ],
)
def test_cpu_offload_is_refused_where_it_cannot_work(
    strategy: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    plan = SimpleNamespace(config=spec(strategy=strategy, cpu_offload=True))
    with pytest.raises(SftError, match=message):
        wrap_model(torch.nn.Linear(2, 2), plan, torch.device("cpu"))


def error_file(path: Path, message: str, mtime: float) -> str:
    # the JSON torchrun's ErrorHandler.record_exception writes in a failed worker
    data = {"message": {"message": message, "extraInfo": {"py_callstack": "", "timestamp": "7"}}}
    path.write_text(json.dumps(data))
    os.utime(path, (mtime, mtime))
    return str(path)


def test_the_rank_that_failed_first_is_named_even_within_one_second(tmp_path: Path) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    crashed = error_file(tmp_path / "1.json", "SftError: bad sample", 1000.2)
    lost_peer = error_file(tmp_path / "0.json", "RuntimeError: Connection closed by peer", 1000.7)
    exc = ChildFailedError(
        "sft", {0: ProcessFailure(0, 11, 1, lost_peer), 1: ProcessFailure(1, 12, 1, crashed)}
    )
    message = launch.describe_failure(exc, tmp_path / "logs")
    assert message.startswith(
        "distributed training failed: rank 1 (local rank 1) stopped "
        "with: SftError: bad sample (ranks [0] failed too)"
    )
    assert str(tmp_path / "logs") in message and crashed in message


def test_the_launcher_refuses_what_a_strategy_cannot_do_before_starting_processes(
    tmp_path: Path,
) -> None:
    config = spec(strategy="zero2")
    config.train.nan_policy = "skip"
    plan = SimpleNamespace(config=config, options=TorchOptions(device="cpu"), run_dir=tmp_path)
    with pytest.raises(SftError, match=r"train\.nan_policy: skip cannot hold back an update"):
        launch.launch(plan)
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_config_validation_reports_strategy_limits_with_everything_else(tmp_path: Path) -> None:
    from sft.config import load_config
    from sft.errors import ConfigError

    (tmp_path / "x.jsonl").write_text('{"text": "hi"}\n')
    overrides = [
        f"data.train={tmp_path / 'x.jsonl'}",
        "torch.device=cpu",
        "parallel.nproc_per_node=2",
        "parallel.strategy=zero3",
        "parallel.cpu_offload=true",
        "train.nan_policy=skip",
    ]
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    text = str(err.value)
    assert "parallel.cpu_offload: offloading moves" in text
    assert "train.nan_policy: skip cannot hold back an update" in text
    # one process: no strategy runs, so its settings are refused as doing nothing
    with pytest.raises(ConfigError) as err:
        load_config(None, [o for o in overrides if "nproc" not in o])
    paths = {p.path for p in err.value.problems}
    assert {"parallel.strategy", "parallel.cpu_offload"} <= paths, str(err.value)
