"""`sft eval`: loss / perplexity on held-out chat data and scored generation tasks, with an
optional before/after comparison against a base model.

    $ sft eval --model runs/smollm2-135m-demo --data configs/smollm2-135m/data/quill_eval.jsonl \\
          --compare smollm2-135m-instruct --json eval.json

`--data` is a jsonl file of generation tasks and chat samples (`sft.evaltasks` reads and scores
them); chat samples' assistant tokens are scored for loss and perplexity.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sft.evalreport import evaluate_cli as core_evaluate_cli
from sft.evalreport import print_comparison, print_single  # noqa: F401  re-exported
from sft.evaltasks import (  # noqa: F401  re-exported: the eval file's tasks live in core
    SCORERS,
    Task,
    TaskResult,
    evaluate_file,
    parse_task,
    read_eval_file,
    score,
)
from sft.evaltasks import run_tasks as core_run_tasks


def chat_loss(model: Any, samples: list[tuple[Any, Any]]) -> dict[str, float]:
    """Token-weighted mean loss over trained (assistant) tokens, and its perplexity."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in samples:
            x = torch.tensor(ids, dtype=torch.long)[None]
            y = torch.tensor(labels, dtype=torch.long)[None]
            logits = model(input_ids=x).logits[0, :-1].float()
            target = y[0, 1:]
            keep = target != -100
            if keep.any():
                nll = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
                total, count = total + float(nll), count + int(keep.sum())
    if count == 0:
        return {}
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def run_tasks(
    loaded: Any, tasks: list[Task], max_new_tokens: int, batch: int = 8
) -> list[TaskResult]:
    """Greedy answers to every task (batched), scored."""
    from sft_torch.generate import Sampling, generate_ids

    sampling = Sampling(max_new_tokens=max_new_tokens)
    return core_run_tasks(
        loaded.tokenizer, tasks, lambda prompts: generate_ids(loaded, prompts, sampling), batch
    )


def evaluate(model: str, data: Path, max_new_tokens: int = 64) -> dict[str, Any]:
    """Loss/perplexity and task results of one model on one eval file, as a JSON-able dict."""
    from sft_torch.generate import load_for_inference

    return evaluate_file(
        model,
        data,
        load_for_inference,
        lambda loaded, samples: chat_loss(loaded.model, samples),
        lambda loaded, tasks: run_tasks(loaded, tasks, max_new_tokens),
    )


def evaluate_cli(
    model: str, data: Path, compare: str | None, json_out: Path | None, max_new_tokens: int
) -> dict[str, Any]:
    """`sft eval`: core's `sft.evalreport.evaluate_cli` with this backend's `evaluate`."""
    return core_evaluate_cli(evaluate, model, data, compare, json_out, max_new_tokens)
