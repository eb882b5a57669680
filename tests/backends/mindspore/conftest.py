"""Helpers for the MindSpore backend tests (run in .venvs/ms by `make test-ms`).

This conftest imports neither mindspore nor sft_mindspore at module level (other environments
collect this directory too); each test module skips itself where mindspore is missing.

A TrainPlan is built by hand from synthetic token data (the data pipeline has its own tests),
then trained for real by MindFormers on CPU. Torch-side checks run a small script with
$SFT_TORCH_PYTHON (the torch environment) and carry the result back as JSON.

    plan = make_plan(tmp_path, tiny_llama, method="lora", train={"max_steps": 4})
    result = train(plan, RunEvents(plan.config, plan.run_dir, get_plugins().hook))
    losses = torch_losses([(model_dir, batch, None)], tmp_path)
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sft.backend import TrainPlan
from sft.data.cache import IGNORE_INDEX, PreparedData, TokenizedSplit
from sft.models import load_resolved
from sft.specs import RunConfig

TORCH_REF = Path(__file__).with_name("torch_ref.py")
TORCH_RUN = Path(__file__).with_name("torch_run.py")


@pytest.fixture(autouse=True)
def _mindformers_logs(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MindFormers writes its logs under $LOCAL_DEFAULT_PATH (default: ./output in the cwd).
    monkeypatch.setenv("LOCAL_DEFAULT_PATH", str(tmp_path_factory.mktemp("mf-logs")))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def synthetic_split(n: int = 4, seed: int = 0, vocab: int = 300) -> TokenizedSplit:
    """n samples of 12-20 random tokens (ids 3..vocab); the first third of each is 'prompt'."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        length = int(rng.integers(12, 21))
        ids = rng.integers(3, vocab, length).tolist()
        cut = length // 3
        samples.append((ids, [IGNORE_INDEX] * cut + ids[cut:]))
    return TokenizedSplit.from_samples(samples)


def make_plan(
    run_dir: Path,
    model_dir: Path,
    method: str = "lora",
    split: Any = None,
    train: dict | None = None,
    parallel: dict | None = None,
    checkpoint: dict | None = None,
    **options: Any,
) -> TrainPlan:
    method_spec: Any = (
        {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0} if method == "lora" else method
    )
    cfg = RunConfig.model_validate(
        {
            "backend": "mindspore",
            "model": str(model_dir),
            "data": {"train": "unused.jsonl", "max_seq_len": 64, "shuffle": True},
            "method": method_spec,
            "train": {
                "max_steps": 6,
                "micro_batch_size": 2,
                "warmup_steps": 0,
                "learning_rate": 1e-2 if method == "lora" else 2e-3,
                **(train or {}),
            },
            "parallel": parallel or {},
            "checkpoint": checkpoint or {},
            "output_dir": str(run_dir),
        }
    )
    split = split if split is not None else synthetic_split()
    data = PreparedData(
        cache_dir=run_dir / "cache",
        key="synthetic",
        train=split,
        eval=None,
        tokenizer_dir=str(model_dir),
        pad_id=0,
        eos_ids=[2],
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    from sft_mindspore.plugin import MindSporeOptions

    opts = MindSporeOptions(device_target="CPU", threads=1, **options)
    return TrainPlan(
        config=cfg,
        options=opts,
        run_dir=run_dir,
        model=load_resolved(Path(model_dir), str(model_dir)),
        data=data,
    )


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def first_step_batch(run_dir: Path, rows: int) -> dict[str, np.ndarray]:
    """The first optimizer step's rows, read back from the run's MindRecord."""
    from sft_mindspore.data import read_mindrecord

    recs = read_mindrecord(run_dir / "mindformers" / "data" / "train.mindrecord")[:rows]
    return {k: np.stack([r[k] for r in recs]) for k in ("input_ids", "labels")}


def torch_python() -> str:
    exe = os.environ.get("SFT_TORCH_PYTHON")
    if not exe:
        pytest.skip(
            "SFT_TORCH_PYTHON is unset: the torch reference needs the torch "
            "environment's python (`make test-ms` sets it)"
        )
    return exe


def torch_losses(
    jobs: list[tuple[Path, dict[str, np.ndarray], Path | None]], work: Path
) -> list[float]:
    """Mean token loss of a plain transformers (+ peft adapter) forward for each
    (model dir, batch, adapter dir or None), computed in the torch environment."""
    exe = torch_python()
    work.mkdir(parents=True, exist_ok=True)
    spec = []
    for i, (model, batch, adapter) in enumerate(jobs):
        np.savez(work / f"batch_{i}.npz", **batch)
        spec.append(
            {
                "model": str(model),
                "batch": str(work / f"batch_{i}.npz"),
                "adapter": str(adapter) if adapter else None,
            }
        )
    (work / "jobs.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [exe, str(TORCH_REF), str(work / "jobs.json"), str(work / "out.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r["loss"] for r in json.loads((work / "out.json").read_text())]


def torch_train(plan: TrainPlan, run_dir: Path) -> Path:
    """Train `plan`'s spec on `plan`'s token data with the torch backend, in the torch
    environment (torch_run.py); returns its run directory (metrics.jsonl, final/,
    summary.json, init_lora_a.npz)."""
    exe = torch_python()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = plan.config.model_dump(mode="json", exclude={"backend_options", "output_dir"})
    split = plan.data.train
    samples = [[a.tolist() for a in split.sample(i)] for i in range(len(split))]
    job = {
        "config": {**config, "backend": "torch"},
        "samples": samples,
        "model": str(plan.model.path),
        "run_dir": str(run_dir),
        "pad_id": plan.data.pad_id,
        "eos_ids": plan.data.eos_ids,
    }
    (run_dir / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["OMP_NUM_THREADS"] = "1"
    # the torch side runs this checkout's sft and sft_torch, whatever the venv's installs are
    repo = Path(__file__).resolve().parents[3]
    env["PYTHONPATH"] = os.pathsep.join(
        str(repo / d) for d in ("core/src", "backends/torch/src", "plugins/tensorboard/src")
    )
    cmd = [exe, str(TORCH_RUN), str(run_dir / "job.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir
