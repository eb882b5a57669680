"""Multi-process training end to end on CPU with gloo: `sft run ... parallel.nproc_per_node=2`
re-launches through torchrun, and every strategy must train exactly what one process trains
with the same global batch (fp32, tiny llama, real `sft run` flow with a real data file).

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_distributed.py

Each launch starts 2 fresh Python processes (imports + model load dominate: ~30 s per launch on
2 cores), so the runs are few and short: 4 optimizer steps of global batch 8 over 21 training
samples, which crosses an epoch and ends the epoch with a short step that leaves rank 1 with
fewer micro-batches than rank 0 (the padding path); 5 held-out samples are evaluated at the end,
sharded over the ranks the same uneven way.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402
from sft.config import load_config  # noqa: E402
from sft.errors import SftError  # noqa: E402
from sft.events import read_metrics  # noqa: E402
from sft.run import run  # noqa: E402
from sft_torch.sample_log import ENV as SAMPLE_LOG  # noqa: E402
from sft_torch.sample_log import read_sample_log  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]

WORDS = "the quick brown fox jumps over lazy dog capital france paris hello cats sea".split()
TOL = 1e-5


def write_data(path: Path, n: int = 26) -> None:
    rng = __import__("random").Random(0)
    with path.open("w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
            f.write(json.dumps({"instruction": q, "output": a}) + "\n")


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """A job spec every test runs with overrides. The data cache is in the spec, so the
    reference runs prepare it once and every launch (and every rank) reads it."""
    root = tmp_path_factory.mktemp("dist")
    write_data(root / "train.jsonl")
    spec = {
        "model": str(tiny_llama),
        "data": {
            "train": "train.jsonl",
            "eval_fraction": 0.2,  # 5 of 26 held out: an odd count, so eval pads a rank too
            "max_seq_len": 256,
            "packing": False,
            "group_by_length": False,
            "template": "chatml",
            "cache_dir": str(root / "cache"),
        },
        "method": "full",
        "train": {
            "max_steps": 4,
            "learning_rate": 3e-3,
            "lr_scheduler": "constant",
            "warmup_steps": 0,
            "precision": "fp32",
            "micro_batch_size": 2,
            "global_batch_size": 8,
        },
        "logging": {"progress": False, "plot": False},
        "torch": {"device": "cpu", "num_threads": 1},
    }
    (root / "job.yaml").write_text(yaml.safe_dump(spec))
    return root / "job.yaml"


def sft_run(job: Path, out: Path, *overrides: str) -> dict:
    """`sft run` in this process (the launcher; torchrun's workers are new processes)."""
    return run(load_config(job, [f"output_dir={out}", *overrides]))


LORA = "method={name: lora, r: 4, alpha: 8, dropout: 0.0}"  # no dropout: RNG differs per rank


@pytest.fixture(scope="module")
def reference(job: Path) -> Path:
    """One process, full fine-tuning: what every 2-process full run must reproduce. It logs
    its samples per step (sft_torch.sample_log): the global batches the ranks must split."""
    out = job.parent / "ref-full"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SAMPLE_LOG, "1")
        sft_run(job, out)
    return out


@pytest.fixture(scope="module")
def reference_lora(job: Path) -> Path:
    out = job.parent / "ref-lora"
    sft_run(job, out, LORA)
    return out


def assert_same_run(
    run_dir: Path, ref: Path, weights: str = "model/model.safetensors", steps: int = 4
) -> None:
    """Same final weights (within 1e-5) and the same loss at every step."""
    mine, theirs = (
        load_file(str(run_dir / "final" / weights)),
        load_file(str(ref / "final" / weights)),
    )
    assert sorted(mine) == sorted(theirs)
    worst = max(float((mine[k].float() - theirs[k].float()).abs().max()) for k in mine)
    assert worst < TOL, f"final weights differ by {worst}"
    a = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    b = [r["loss"] for r in read_metrics(ref) if "loss" in r][-steps:]  # a resume logs the rest
    assert len(a) == len(b) == steps
    assert a == pytest.approx(b, rel=TOL, abs=TOL)
    assert any(x != y for x, y in itertools.pairwise(b))  # a curve, not a constant
    # AdamW divides a constant gradient factor out (and clipping caps it), so equal weights do
    # not show equal gradients: the logged pre-clipping norms must agree too
    ga = [r["grad_norm"] for r in read_metrics(run_dir) if "grad_norm" in r]
    gb = [r["grad_norm"] for r in read_metrics(ref) if "grad_norm" in r][-steps:]
    assert len(ga) == len(gb) == steps
    assert ga == pytest.approx(gb, rel=1e-4), "per-step grad_norm differs from one process"
    # the final eval is sharded over ranks and summed back: same loss on the same tokens
    mine_eval = json.loads((run_dir / "summary.json").read_text())["metrics"]
    ref_eval = json.loads((ref / "summary.json").read_text())["metrics"]
    assert mine_eval["eval_tokens"] == ref_eval["eval_tokens"] > 0
    assert mine_eval["eval_loss"] == pytest.approx(ref_eval["eval_loss"], rel=TOL)


def assert_ranks_split_the_global_batches(run_dir: Path, ref: Path, steps: int = 4) -> None:
    """Every step, the two ranks trained disjoint rows whose union is exactly the global batch
    the one-process reference trained at that step (by sample ids, from the sample logs)."""
    whole = read_sample_log(ref, 0)
    ranks = [read_sample_log(run_dir, r) for r in (0, 1)]
    assert sorted(whole) == sorted(ranks[0]) == sorted(ranks[1]) == list(range(1, steps + 1))
    for step in whole:
        r0, r1 = (sorted(map(tuple, r[step])) for r in ranks)
        assert r0 and r1, f"step {step}: a rank trained nothing ({r0}, {r1})"
        overlap = set(r0) & set(r1)
        assert not overlap, f"step {step}: both ranks trained rows {sorted(overlap)}"
        assert sorted(r0 + r1) == sorted(map(tuple, whole[step])), (
            f"step {step}: ranks trained {r0} + {r1}, the global batch is {whole[step]}"
        )


def test_ddp_two_processes_equal_one_process_and_resume_on_one(
    job: Path, reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SAMPLE_LOG, "1")  # each rank logs its rows (torchrun passes it on)
    out = job.parent / "ddp"
    summary = sft_run(job, out, "parallel.nproc_per_node=2", "checkpoint.every_steps=2")
    assert summary["steps"] == 4
    assert summary["metrics"]["world_size"] == 2 and summary["metrics"]["strategy"] == "ddp"
    assert_ranks_split_the_global_batches(out, reference)
    assert_same_run(out, reference)
    # rank 0 alone writes the run's files; every rank's log is kept
    assert len(list((out / "logs" / "node0").rglob("stdout.log"))) == 2
    # resume the 2-process checkpoint of step 2 with ONE process: DDP checkpoints hold whole
    # tensors and a global data position, so the world size may change
    resumed = job.parent / "ddp-resumed-on-1"
    ckpt = out / "checkpoints" / "step-000002"
    summary = sft_run(job, resumed, f"checkpoint.resume={ckpt}")
    assert summary["metrics"]["resumed_at_step"] == 2
    mine = load_file(str(resumed / "final" / "model" / "model.safetensors"))
    ref = load_file(str(reference / "final" / "model" / "model.safetensors"))
    assert max(float((mine[k] - ref[k]).abs().max()) for k in ref) < TOL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_over_loopback(job: Path, reference: Path) -> None:
    out = job.parent / "two-nodes"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", SAMPLE_LOG: "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sft",
                "run",
                "--config",
                str(job),
                f"output_dir={out}",
                "parallel.nnodes=2",
                f"parallel.node_rank={node}",
                "parallel.nproc_per_node=1",
                "parallel.master_addr=127.0.0.1",
                f"parallel.master_port={port}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for node, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {node}:\n{text[-3000:]}"
    assert_ranks_split_the_global_batches(out, reference)  # one rank per node
    assert_same_run(out, reference)
    assert json.loads((out / "summary.json").read_text())["steps"] == 4  # node 0's summary


def test_fsdp2_lora_matches_one_process_and_consolidates(job: Path, reference_lora: Path) -> None:
    out = job.parent / "fsdp"
    sft_run(
        job,
        out,
        LORA,
        "parallel.nproc_per_node=2",
        "parallel.strategy=fsdp",
        "checkpoint.every_steps=2",
    )
    # the sharded adapter was gathered into a normal PEFT adapter
    assert (out / "final" / "adapter" / "adapter_config.json").exists()
    assert_same_run(out, reference_lora, weights="adapter/adapter_model.safetensors")
    ckpt = out / "checkpoints" / "step-000002"
    meta = json.loads((ckpt / "sft-checkpoint.json").read_text())
    assert meta["parallel"] == {"strategy": "fsdp", "world_size": 2, "format": "fsdp-full"}
    weights = load_file(str(ckpt / "trainable.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    adapter = load_file(str(reference_lora / "final" / "adapter" / "adapter_model.safetensors"))
    shapes = sorted(tuple(t.shape) for t in weights.values())
    assert shapes == sorted(tuple(t.shape) for t in adapter.values())  # whole, not shards
    # consolidated: one process resumes it (optimizer state keyed by name) and ends the same
    resumed = job.parent / "fsdp-resumed-on-1"
    summary = sft_run(job, resumed, LORA, f"checkpoint.resume={ckpt}")
    assert summary["metrics"]["resumed_at_step"] == 2
    assert_same_run(resumed, reference_lora, weights="adapter/adapter_model.safetensors", steps=2)
    # and two FSDP2 processes resume it: rank 0 reads the files, broadcast_from_rank0 hands
    # each rank its shards of the weights and the optimizer state
    resumed = job.parent / "fsdp-resumed-on-2"
    summary = sft_run(
        job,
        resumed,
        LORA,
        "parallel.nproc_per_node=2",
        "parallel.strategy=fsdp",
        f"checkpoint.resume={ckpt}",
    )
    assert summary["metrics"]["resumed_at_step"] == 2
    assert_same_run(resumed, reference_lora, weights="adapter/adapter_model.safetensors", steps=2)


def test_deepspeed_zero2_two_processes_equal_one_process(job: Path, reference: Path) -> None:
    pytest.importorskip("deepspeed")
    out = job.parent / "zero2"
    sft_run(job, out, "parallel.nproc_per_node=2", "parallel.strategy=zero2")
    assert_same_run(out, reference)


def test_a_crashing_rank_fails_the_job_quickly_naming_it(
    job: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SFT_FAULT_RANK", "1")
    out = job.parent / "crash"
    start = time.monotonic()
    with pytest.raises(SftError) as err:
        sft_run(job, out, "parallel.nproc_per_node=2")
    elapsed = time.monotonic() - start
    message = str(err.value)
    assert "rank 1" in message and "injected failure on rank 1" in message, message
    assert str(out / "logs") in message
    assert elapsed < 120, f"the job took {elapsed:.0f} s to fail"
    assert not (out / "summary.json").exists()
    shutil.rmtree(out)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_two_gpus_equal_one_gpu(job: Path, strategy: str) -> None:
    """The same on CUDA with nccl (needs 2 GPUs; not run in CI)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    gpu = ["torch.device=cuda", "model.dtype=float32"]
    ref = job.parent / "gpu-ref"
    if not (ref / "summary.json").exists():
        sft_run(job, ref, *gpu)
    out = job.parent / f"gpu-{strategy}"
    sft_run(job, out, *gpu, "parallel.nproc_per_node=2", f"parallel.strategy={strategy}")
    mine = load_file(str(out / "final" / "model" / "model.safetensors"))
    theirs = load_file(str(ref / "final" / "model" / "model.safetensors"))
    worst = max(float((mine[k].float() - theirs[k].float()).abs().max()) for k in theirs)
    assert worst < 1e-4, f"final weights differ by {worst}"  # GPU reductions are reordered
