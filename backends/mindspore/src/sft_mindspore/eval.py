"""`sft eval` and `eval.prompts` without torch: loss / perplexity on held-out chat records and
greedy generation tasks scored as the torch backend scores them, with MindFormers' network.

    $ sft eval --model runs/qwen2-tiny-lora --data held_out.jsonl --compare BASE_DIR

The file's format and the scoring are core's (`sft.evaltasks`); the results are the same dict
the torch backend's `evaluate` returns, so `eval/report.json` and the before/after table are the
same on both backends.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sft.errors import SftError
from sft.evalreport import print_comparison, print_single
from sft.evaltasks import Task, TaskResult, encode_chats, read_eval_file, score

from sft_mindspore.generate import Loaded, Sampling, generate_ids, render_prompt
from sft_mindspore.heldout import token_nll


def chat_loss(loaded: Loaded, samples: list[tuple[Any, Any]]) -> dict[str, float]:
    """Token-weighted mean loss over trained (assistant) tokens, and its perplexity."""
    import mindspore as ms
    import numpy as np

    total, count = 0.0, 0
    for ids, labels in samples:
        ids, labels = np.asarray(ids, np.int32), np.asarray(labels, np.int32)
        net = loaded.network(len(ids))
        seq = int(net.config.seq_length)
        x = np.zeros((1, seq), np.int32)
        y = np.full((1, seq), -100, np.int32)
        x[0, : len(ids)] = ids
        y[0, : len(ids) - 1] = labels[1:]  # position t predicts token t + 1
        out = net(ms.Tensor(x), ms.Tensor(y))
        logits = (out[0] if isinstance(out, tuple) else out).asnumpy()
        nll, n = token_nll(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        total, count = total + nll, count + n
    if count == 0:
        return {}
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def run_tasks(loaded: Loaded, tasks: list[Task], max_new_tokens: int) -> list[TaskResult]:
    """Greedy answers to every task, scored."""
    sampling = Sampling(max_new_tokens=max_new_tokens)
    results = []
    for task in tasks:
        new = generate_ids(loaded, render_prompt(loaded.tokenizer, task.messages), sampling)
        answer = str(loaded.tokenizer.decode(new, skip_special_tokens=True)).strip()
        results.append(score(task, answer))
    return results


def evaluate(model: str, data: Path, max_new_tokens: int = 64) -> dict[str, Any]:
    """Loss/perplexity and task results of one model on one eval file, as a JSON-able dict
    (the torch backend's `evaluate` keys)."""
    from sft_mindspore.generate import load_for_inference

    tasks, chats = read_eval_file(data)
    if not tasks and not chats:
        raise SftError(f"{data} has no records")
    loaded = load_for_inference(model)
    out: dict[str, Any] = {"model": model, "loaded": loaded.source, "data": str(data)}
    if chats:
        out["loss"] = chat_loss(loaded, encode_chats(loaded.tokenizer, chats))
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
