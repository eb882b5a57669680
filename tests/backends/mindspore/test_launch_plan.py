"""`sft run --dry-run` plans an Ascend run on this CPU machine (MindFormers YAML, every node's
launch commands, nothing trained), and rank-table launches start one process per device with
the variables MindSpore reads.

$ .venvs/ms/bin/python -m pytest tests/backends/mindspore/test_launch_plan.py
"""

from __future__ import annotations

import json
import sys

import pytest
import yaml

pytest.importorskip("mindspore")

from sft.cli import main
from sft.errors import SftError
from sft.specs import ParallelSpec
from sft_mindspore.launch import WORKER, Process, _run_rank_table, launch_plan

pytestmark = pytest.mark.mindspore


def rank_table(path, servers: int = 2, devices: int = 8):
    table = {
        "version": "1.0",
        "server_count": str(servers),
        "server_list": [
            {
                "server_id": f"10.0.0.{s + 1}",
                "device": [
                    {
                        "device_id": str(d),
                        "device_ip": f"192.168.{s}.{d}",
                        "rank_id": str(s * devices + d),
                    }
                    for d in range(devices)
                ],
                "host_nic_ip": "reserve",
            }
            for s in range(servers)
        ],
        "status": "completed",
    }
    path.write_text(json.dumps(table))
    return path


def _spec(tmp_path, model, text: str):
    lines = [
        json.dumps({"prompt": f"What is {i}?", "completion": f"It is {i}."}) for i in range(40)
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    path = tmp_path / "c.yaml"
    path.write_text(
        f"backend: mindspore\nmodel: {model}\ndata: {{train: d.jsonl}}\n"
        f"output_dir: {tmp_path / 'run'}\ntrain: {{max_steps: 5}}\n" + text
    )
    return path


TWO_NODES = (
    "parallel: {nproc_per_node: 8, nnodes: 2, master_addr: 10.0.0.1, master_port: 8118}\n"
    "mindspore: {device_target: Ascend, hccl_connect_timeout: 1200}\n"
)


def test_dry_run_plans_two_ascend_nodes_without_training(tmp_path, tiny_llama, capsys):
    rc = main(["run", "--dry-run", "-c", str(_spec(tmp_path, tiny_llama, TWO_NODES))])
    out = capsys.readouterr()
    assert rc == 0, out.err
    run = tmp_path / "run"
    doc = yaml.safe_load((run / "mindformers.yaml").read_text())
    assert doc["context"]["device_target"] == "Ascend"
    assert doc["parallel_config"]["data_parallel"] == 16
    assert doc["model"]["model_config"]["compute_dtype"] == "bfloat16"
    # every node's msrun command, printed and in launch.sh / plan.json
    plan = json.loads((run / "plan.json").read_text())
    assert sorted(plan["commands"]) == ["node 0", "node 1"]
    for node in (0, 1):
        (cmd,) = plan["commands"][f"node {node}"]
        assert f"--node_rank {node}" in cmd and "--worker_num 16 --local_worker_num 8" in cmd
        assert "--master_addr 10.0.0.1 --master_port 8118" in cmd
        assert f"msrun/node_{node}" in cmd and "HCCL_CONNECT_TIMEOUT=1200" in cmd
        assert cmd in out.out and cmd in (run / "launch.sh").read_text()
    assert "compute_dtype: bfloat16" in out.out  # the YAML itself is printed
    assert (run / "config.yaml").is_file()
    # nothing trained, no weights converted, no data written
    mf = run / "mindformers"
    assert not (mf / "init").exists() and not (mf / "data").exists()
    assert not (run / "metrics.jsonl").exists() and not (run / "final").exists()


def test_rank_table_starts_one_process_per_device_on_every_node(tmp_path, tiny_llama, monkeypatch):
    table = rank_table(tmp_path / "hccl_2x8.json")
    spec = _spec(
        tmp_path,
        tiny_llama,
        "parallel: {nproc_per_node: 8, nnodes: 2}\nmindspore: {device_target: Ascend}\n",
    )
    for how in ("option", "env"):
        if how == "option":
            args = [f"parallel.rank_table_file={table}"]
        else:
            monkeypatch.setenv("RANK_TABLE_FILE", str(table))
            args = []
        assert main(["run", "--dry-run", "-c", str(spec), *args]) == 0
        plan = json.loads((tmp_path / "run" / "plan.json").read_text())
        assert plan["summary"]["launch"] == "rank table"
        for node in (0, 1):
            cmds = plan["commands"][f"node {node}"]
            assert len(cmds) == 8
            for d, cmd in enumerate(cmds):
                assert f"RANK_ID={node * 8 + d} DEVICE_ID={d} RANK_SIZE=16" in cmd
                assert f"RANK_TABLE_FILE={table}" in cmd and "msrun" not in cmd
                assert f"ranktable/node_{node}/worker_{node * 8 + d}.log" in cmd


@pytest.mark.parametrize(
    "text,match",
    [
        ("parallel: {nproc_per_node: 8, nnodes: 1}\n", "lists 2 servers but parallel.nnodes is 1"),
        ("parallel: {nproc_per_node: 4, nnodes: 2}\n", r"lists \[8\] devices per server"),
    ],
)
def test_rank_table_must_match_the_parallel_layout(tmp_path, tiny_llama, capsys, text, match):
    table = rank_table(tmp_path / "hccl.json")
    spec = _spec(tmp_path, tiny_llama, text + "mindspore: {device_target: Ascend}\n")
    assert main(["config", "validate", "-c", str(spec), f"parallel.rank_table_file={table}"]) == 2
    err = capsys.readouterr().err
    assert "parallel.rank_table_file" in err and "Traceback" not in err
    import re

    assert re.search(match, err), err


def test_rank_table_on_cpu_is_refused(tmp_path, tiny_llama, capsys):
    table = rank_table(tmp_path / "hccl.json", servers=1, devices=2)
    spec = _spec(
        tmp_path, tiny_llama, "parallel: {nproc_per_node: 2}\nmindspore: {device_target: CPU}\n"
    )
    assert main(["config", "validate", "-c", str(spec), f"parallel.rank_table_file={table}"]) == 2
    assert "rank table describes Ascend devices" in capsys.readouterr().err


def test_rank_table_processes_get_their_variables_and_a_failure_names_the_rank(tmp_path):
    """The launcher's own part (no HCCL here): each process sees its RANK_ID / DEVICE_ID, and
    when one exits non-zero the others are stopped and the error names that rank's log."""
    show = "import os, sys; print(os.environ['RANK_ID'], os.environ['DEVICE_ID']); "
    procs = [
        Process(
            0,
            [sys.executable, "-c", show + "sys.exit(0)"],
            {"RANK_ID": "0", "DEVICE_ID": "0"},
            tmp_path / "worker_0.log",
        ),
        Process(
            0,
            [sys.executable, "-c", show + "sys.exit(0)"],
            {"RANK_ID": "1", "DEVICE_ID": "3"},
            tmp_path / "worker_1.log",
        ),
    ]
    _run_rank_table(procs, tmp_path, 1)
    assert (tmp_path / "worker_1.log").read_text().strip() == "1 3"
    procs[1].argv[-1] = show + "raise SystemExit('ValueError: device lost')"
    procs[0].argv[-1] = show + "import time; time.sleep(60)"
    with pytest.raises(SftError, match=r"rank 1 failed.*worker_1.log"):
        _run_rank_table(procs, tmp_path, 1)


def test_single_device_and_msrun_plans(tmp_path):
    one = launch_plan(tmp_path / "m.yaml", ParallelSpec(), tmp_path, {})
    assert len(one) == 1 and one[0].argv[1:] == [str(WORKER), "--config", str(tmp_path / "m.yaml")]
    local = launch_plan(tmp_path / "m.yaml", ParallelSpec(nproc_per_node=2), tmp_path, {})
    assert len(local) == 1 and local[0].log == tmp_path / "msrun.log"  # one node: as before


def test_the_shipped_ascend_example_plans_on_two_nodes(tmp_path, tiny_qwen2):
    """examples/ascend (with a tiny model in place of Qwen2.5-7B): msrun and rank-table plans."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[3] / "examples" / "ascend"
    base = [
        "run",
        "--dry-run",
        "-c",
        str(root / "qwen2.5-7b-full.yaml"),
        f"model={tiny_qwen2}",
        f"output_dir={tmp_path / 'run'}",
        "parallel.nnodes=2",
        "train.gradient_accumulation_steps=2",  # the bundled 65 samples fill a step of 32
    ]
    assert main([*base, "parallel.master_addr=10.0.0.1"]) == 0
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert [len(plan["commands"][f"node {n}"]) for n in (0, 1)] == [1, 1]
    doc = yaml.safe_load((tmp_path / "run" / "mindformers.yaml").read_text())
    assert doc["parallel_config"]["pipeline_stage"] == 2
    assert doc["parallel_config"]["data_parallel"] == 8
    assert main([*base, f"parallel.rank_table_file={root / 'hccl_2x8.json'}"]) == 0
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert [len(plan["commands"][f"node {n}"]) for n in (0, 1)] == [8, 8]
