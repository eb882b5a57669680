"""Helpers for the torch backend tests: a TrainPlan built by hand from synthetic token data, so
the training loop is tested without the data pipeline (which has its own tests).

    plan = make_plan(tmp_path, tiny_llama, method="lora", train={"max_steps": 3})
    result = train(plan, RunEvents(plan.config, plan.run_dir, get_plugins().hook))
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sft.backend import TrainPlan
from sft.data.cache import IGNORE_INDEX, PreparedData, TokenizedSplit
from sft.events import RunEvents
from sft.models import load_resolved
from sft.plugins import get_plugins
from sft.specs import RunConfig

if importlib.util.find_spec("sft_torch") is None or importlib.util.find_spec("torch") is None:
    # an environment without the torch backend collects nothing here
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # 2 shared cores: tiny models gain nothing from more


def synthetic_samples(
    vocab: int, n: int, seed: int = 0, lo: int = 6, hi: int = 24
) -> list[tuple[list[int], list[int]]]:
    """`n` variable-length samples of learnable token runs (start, start+stride, ...); the first
    third of each sample is a masked prompt."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(lo, hi + 1))
        start, stride = int(rng.integers(0, vocab)), int(rng.integers(1, 4))
        ids = [3 + (start + k * stride) % (vocab - 3) for k in range(length)]
        labels = [IGNORE_INDEX if k < length // 3 else t for k, t in enumerate(ids)]
        out.append((ids, labels))
    return out


def vocab_size(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


def make_plan(
    tmp_path: Path,
    model_dir: Path,
    *,
    method: Any = "lora",
    train: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    torch_opts: dict[str, Any] | None = None,
    n: int = 16,
    seed: int = 0,
    packing: bool = False,
    eval_n: int = 0,
    run_dir: Path | None = None,
    resume_from: Path | None = None,
    **top: Any,
) -> TrainPlan:
    from sft_torch.plugin import TorchOptions

    vocab = vocab_size(model_dir)
    tr = {
        "max_steps": 4,
        "learning_rate": 1e-2,
        "precision": "fp32",
        "warmup_steps": 0,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        **(train or {}),
    }
    config = RunConfig.model_validate(
        {
            "data": {
                "train": "synthetic.jsonl",
                "max_seq_len": 64,
                "group_by_length": False,
                **(data or {}),
            },
            "method": method,
            "train": tr,
            "logging": {"progress": False, "plot": False, **top.pop("logging", {})},
            "backend_options": {"torch": {"device": "cpu", **(torch_opts or {})}},
            **top,
        }
    )
    train_split = TokenizedSplit.from_samples(synthetic_samples(vocab, n, seed))
    eval_split = (
        TokenizedSplit.from_samples(synthetic_samples(vocab, eval_n, seed + 1)) if eval_n else None
    )
    prepared = PreparedData(
        cache_dir=tmp_path / "cache",
        key=f"synthetic-{seed}-{n}",
        train=train_split,
        eval=eval_split,
        tokenizer_dir=str(model_dir),
        pad_id=0,
        eos_ids=[2],
    )
    run = run_dir or tmp_path / "run"
    run.mkdir(parents=True, exist_ok=True)
    return TrainPlan(
        config=config,
        options=TorchOptions.model_validate(config.options),
        run_dir=run,
        model=load_resolved(model_dir, str(model_dir)),
        data=prepared,
        resume_from=resume_from,
        packing=packing,
    )


def events_for(plan: TrainPlan) -> RunEvents:
    return RunEvents(plan.config, plan.run_dir, get_plugins().hook)


def run_train(plan: TrainPlan) -> Any:
    from sft_torch.train import train

    return train(plan, events_for(plan))
