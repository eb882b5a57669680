"""`sft eval` and `eval.prompts` without torch: loss / perplexity on held-out chat records and
greedy generation tasks scored as the torch backend scores them, with MindFormers' network.

    $ sft eval --model runs/qwen2-tiny-lora --data held_out.jsonl --compare BASE_DIR

The file's format and the scoring are core's (`sft.evaltasks`); the results are the same dict
the torch backend's `evaluate` returns, so `eval/report.json` and the before/after table are the
same on both backends.

`sft run`'s `eval.prompts` evaluates in a child process (`evaluate_in_subprocess`), so the
device memory the model takes is released before the training workers start (on Ascend they
use the same device):

    $ python -m sft_mindspore.eval --model DIR --data prompts.jsonl --max-new-tokens 64 --out r.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sft.errors import SftError
from sft.evalreport import evaluate_cli as core_evaluate_cli
from sft.evaltasks import Task, TaskResult, evaluate_file
from sft.evaltasks import run_tasks as core_run_tasks

from sft_mindspore.generate import Loaded, Sampling, generate_ids
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
    """Greedy answers to every task, scored (one prompt at a time: batch 1 networks)."""
    sampling = Sampling(max_new_tokens=max_new_tokens)
    return core_run_tasks(
        loaded.tokenizer,
        tasks,
        lambda prompts: [generate_ids(loaded, p, sampling) for p in prompts],
    )


def evaluate(model: str, data: Path, max_new_tokens: int = 64) -> dict[str, Any]:
    """Loss/perplexity and task results of one model on one eval file, as a JSON-able dict
    (the torch backend's `evaluate` keys: both are core's `sft.evaltasks.evaluate_file`)."""
    from sft_mindspore.generate import load_for_inference

    return evaluate_file(
        model,
        data,
        load_for_inference,
        chat_loss,
        lambda loaded, tasks: run_tasks(loaded, tasks, max_new_tokens),
    )


def evaluate_cli(
    model: str, data: Path, compare: str | None, json_out: Path | None, max_new_tokens: int
) -> dict[str, Any]:
    """`sft eval`: core's `sft.evalreport.evaluate_cli` with this backend's `evaluate`."""
    return core_evaluate_cli(evaluate, model, data, compare, json_out, max_new_tokens)


def evaluate_in_subprocess(model: str, data: Path, max_new_tokens: int) -> dict[str, Any]:
    """`evaluate` in a fresh process of this environment's python; its output (MindFormers'
    logs) is shown only when it fails."""
    with tempfile.TemporaryDirectory(prefix="sft-eval-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "sft_mindspore.eval", "--model", model, "--data", str(data)]
        cmd += ["--max-new-tokens", str(max_new_tokens), "--out", str(out)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode:
            tail = "\n  ".join(proc.stdout.strip().splitlines()[-8:])
            raise SftError(
                f"evaluating {model} on {data} failed (exit {proc.returncode}):\n  {tail}"
            )
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="sft eval on MindFormers, result as JSON")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.model, args.data, args.max_new_tokens)
    except SftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
