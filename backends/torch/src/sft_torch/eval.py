"""`sft eval`: loss / perplexity on held-out chat data and scored generation tasks, with an
optional before/after comparison against a base model.

    $ sft eval --model runs/smollm2-135m-demo --data configs/smollm2-135m/data/quill_eval.jsonl \\
          --compare smollm2-135m-instruct --json eval.json

`--data` is a jsonl file of generation tasks and chat samples (`sft.evaltasks` reads and scores
them); chat samples' assistant tokens are scored for loss and perplexity.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sft.errors import SftError
from sft.evalreport import print_comparison, print_single
from sft.evaltasks import (  # noqa: F401  re-exported: the eval file's tasks live in core
    SCORERS,
    Task,
    TaskResult,
    encode_chats,
    parse_task,
    read_eval_file,
    score,
)


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
    """Greedy answers to every task, scored."""
    from sft_torch.generate import Sampling, generate_ids, render_prompt

    results = []
    sampling = Sampling(max_new_tokens=max_new_tokens)
    for i in range(0, len(tasks), batch):
        chunk = tasks[i : i + batch]
        prompts = [render_prompt(loaded.tokenizer, t.messages) for t in chunk]
        for task, new in zip(chunk, generate_ids(loaded, prompts, sampling), strict=True):
            answer = str(loaded.tokenizer.decode(new, skip_special_tokens=True)).strip()
            results.append(score(task, answer))
    return results


def evaluate(model: str, data: Path, max_new_tokens: int = 64) -> dict[str, Any]:
    """Loss/perplexity and task results of one model on one eval file, as a JSON-able dict."""
    from sft_torch.generate import load_for_inference

    tasks, chats = read_eval_file(data)
    if not tasks and not chats:
        raise SftError(f"{data} has no records")
    loaded = load_for_inference(model)
    out: dict[str, Any] = {"model": model, "loaded": loaded.source, "data": str(data)}
    if chats:
        out["loss"] = chat_loss(loaded.model, encode_chats(loaded.tokenizer, chats))
    results = run_tasks(loaded, tasks, max_new_tokens) if tasks else []
    out["tasks"] = [asdict(r) for r in results]
    out["passed"] = sum(r.passed for r in results)
    out["total"] = len(results)
    return out


def evaluate_cli(
    model: str, data: Path, compare: str | None, json_out: Path | None, max_new_tokens: int
) -> dict[str, Any]:
    """`sft eval`: evaluate (and compare), print the table(s), write JSON if asked."""
    after = evaluate(model, data, max_new_tokens)
    result: dict[str, Any] = {"model": after}
    if compare:
        before = evaluate(compare, data, max_new_tokens)
        result = {"before": before, "after": after}
        print_comparison(before, after)
    else:
        print_single(after)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2))
    return result
