"""Two "nodes" (two `sft run` processes, one msrun each, loopback, CPU, data parallel) train into one
shared output directory: node 0 alone writes the shared inputs, node 1 waits for them, each node
logs under its own path, and the run completes.

One loopback artefact: msrun starts a scheduler on every node whose `--master_addr` is one of its
own addresses, which on one host is every node. Node 1's extra scheduler cannot bind the port
node 0's holds, so node 1's msrun exits 1 although its worker joined node 0's cluster and
trained to the end (on separate hosts the master address is not local to node 1 and this does
not happen). The test checks exactly that, and that node 0's run completes.

$ .venvs/ms/bin/python -m pytest tests/backends/mindspore/test_two_nodes.py
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("mindspore")

pytestmark = [pytest.mark.mindspore, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stamp(path) -> tuple[int, str]:
    return path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_nodes_share_one_run_directory(tmp_path, tiny_llama):
    rows = [json.dumps({"prompt": f"What is {i}?", "completion": f"It is {i}."}) for i in range(8)]
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    run = tmp_path / "shared-run"
    spec = tmp_path / "c.yaml"
    spec.write_text(
        f"backend: mindspore\nmodel: {tiny_llama}\ndata: {{train: d.jsonl, max_seq_len: 64}}\n"
        f"output_dir: {run}\nmethod: {{name: lora, r: 4, alpha: 8, dropout: 0.0}}\n"
        "train: {max_steps: 2, micro_batch_size: 1, warmup_steps: 0}\n"
        f"parallel: {{nnodes: 2, nproc_per_node: 1, master_port: {_free_port()}}}\n"
        "mindspore: {device_target: CPU, threads: 1, node_wait_timeout: 300}\n"
    )

    def node(rank: int) -> subprocess.Popen:
        env = dict(os.environ, SFT_CACHE_DIR=str(tmp_path / f"cache-node{rank}"))  # node-local
        cmd = [sys.executable, "-m", "sft", "run", "-c", str(spec), f"parallel.node_rank={rank}"]
        log = (tmp_path / f"node{rank}.out").open("w")
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    mf = run / "mindformers"
    shared = [
        run / "mindformers.yaml",
        mf / "data" / "train.mindrecord",
        mf / "init" / "model.ckpt",
    ]
    node0 = node(0)
    deadline = time.monotonic() + 300
    while not (mf / "prepared.json").is_file():  # node 0 has written every shared input
        assert node0.poll() is None, (tmp_path / "node0.out").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.5)
    before = {p: _stamp(p) for p in shared}
    node1 = node(1)
    rcs = [node0.wait(timeout=600), node1.wait(timeout=600)]
    outs = [(tmp_path / f"node{r}.out").read_text() for r in (0, 1)]
    assert rcs[0] == 0, "\n----\n".join(o[-3000:] for o in outs)
    worker1 = (mf / "msrun" / "node_1" / "worker_1.log").read_text()
    assert "[sft] rank 1 finished" in worker1 and worker1.count("step:[") == 2, outs[1][-3000:]
    if rcs[1] != 0:  # only the loopback artefact described above is tolerated
        sched = (mf / "msrun" / "node_1" / "scheduler.log").read_text()
        assert "Failed to create the TCP server" in sched, outs[1][-3000:]

    # each shared input written once, by node 0: node 1 neither rewrote nor touched them
    assert {p: _stamp(p) for p in shared} == before
    # core's run-directory files come from node 0 only
    assert "node_rank: 0" in (run / "config.yaml").read_text()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert (run / "final" / "adapter" / "adapter_model.safetensors").is_file()
    # per-node logs
    assert (mf / "msrun" / "node_0" / "worker_0.log").is_file()
    assert (mf / "msrun" / "node_1" / "worker_1.log").is_file()
    assert (mf / "msrun" / "node_0.log").is_file() and (mf / "msrun" / "node_1.log").is_file()
