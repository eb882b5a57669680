"""`sft run --dry-run` on the torch backend: the resolved plan and every node's torchrun command,
nothing trained; and the MindSpore-only `parallel.rank_table_file` is refused here.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_dry_run.py
"""

from __future__ import annotations

import json

import pytest
from sft.cli import main

pytestmark = pytest.mark.torch


def _spec(tmp_path, model, text: str = ""):
    rows = [json.dumps({"prompt": f"What is {i}?", "completion": f"It is {i}."}) for i in range(8)]
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    path = tmp_path / "c.yaml"
    path.write_text(
        f"backend: torch\nmodel: {model}\ndata: {{train: d.jsonl}}\noutput_dir: {tmp_path / 'run'}\n"
        + text
    )
    return path


def test_dry_run_prints_every_nodes_torchrun_command(tmp_path, tiny_llama, capsys):
    spec = _spec(
        tmp_path, tiny_llama, "parallel: {nproc_per_node: 4, nnodes: 2, master_addr: 10.0.0.1}\n"
    )
    assert main(["run", "--dry-run", "-c", str(spec)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    plan = json.loads((run / "plan.json").read_text())
    for node in (0, 1):
        (cmd,) = plan["commands"][f"node {node}"]
        assert cmd.startswith("torchrun --nnodes 2 ") and f"--node_rank {node}" in cmd
        assert "--nproc_per_node 4 --master_addr 10.0.0.1" in cmd
        assert f"sft run --config {run / 'config.yaml'}" in cmd and cmd in out
    assert (run / "config.yaml").is_file() and plan["summary"]["samples"] == 8
    assert not (run / "metrics.jsonl").exists() and not (run / "final").exists()


def test_rank_table_is_refused_by_the_torch_backend(tmp_path, tiny_llama, capsys):
    (tmp_path / "hccl.json").write_text("{}")
    spec = _spec(tmp_path, tiny_llama, "parallel: {rank_table_file: hccl.json}\n")
    assert main(["config", "validate", "-c", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "parallel.rank_table_file" in err and "does not support a rank-table launch" in err
