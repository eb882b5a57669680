"""`sft eval`: loss / perplexity on held-out chat data and scored generation tasks, with an
optional before/after comparison against a base model.

    $ sft eval --model runs/smollm2-135m-demo --data configs/smollm2-135m/data/eval.jsonl \\
          --compare smollm2-135m-instruct --json eval.json

`--data` is a jsonl file. A record with `expected`, `contains` or `regex` is a generation task:
its `prompt` (a string) or `messages` (without the answer) is answered greedily and scored:

    {"prompt": "Who are you?", "contains": ["Quill"]}                 all substrings, any case
    {"prompt": "2+2?", "expected": "4"}                                exact match (trimmed)
    {"messages": [...], "regex": "^Quill:"}                            re.search

Every other record is a chat sample in any format the data pipeline reads (messages, sharegpt,
alpaca, prompt/completion); its assistant tokens are scored for loss and perplexity, tokenized
and masked exactly as training does (sft.data.masks).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sft.errors import SftError
from sft.evalreport import print_comparison, print_single

SCORERS = ("expected", "contains", "regex")


@dataclass
class Task:
    messages: list[dict[str, str]]
    expected: str | None = None
    contains: list[str] = field(default_factory=list)
    regex: str | None = None
    where: str = ""

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"] if self.messages else ""


@dataclass
class TaskResult:
    prompt: str
    answer: str
    passed: bool
    checks: dict[str, bool]


def parse_task(record: dict[str, Any], where: str) -> Task:
    """A generation task from one jsonl record; SftError names the line on mistakes."""
    if isinstance(record.get("prompt"), str):
        messages = [{"role": "user", "content": record["prompt"]}]
    elif isinstance(record.get("messages"), list) and record["messages"]:
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    else:
        raise SftError(f"{where}: a generation task needs `prompt` (string) or `messages`")
    contains = record.get("contains") or []
    contains = [contains] if isinstance(contains, str) else list(contains)
    if record.get("regex"):
        try:
            re.compile(record["regex"])
        except re.error as exc:
            raise SftError(f"{where}: bad regex {record['regex']!r}: {exc}") from None
    return Task(messages, record.get("expected"), contains, record.get("regex"), where)


def score(task: Task, answer: str) -> TaskResult:
    """Exact match (whitespace-trimmed), case-insensitive substrings, regex search: all given
    criteria must pass."""
    checks: dict[str, bool] = {}
    if task.expected is not None:
        checks["expected"] = " ".join(answer.split()) == " ".join(str(task.expected).split())
    if task.contains:
        checks["contains"] = all(c.lower() in answer.lower() for c in task.contains)
    if task.regex:
        checks["regex"] = re.search(task.regex, answer) is not None
    return TaskResult(task.prompt, answer, all(checks.values()) and bool(checks), checks)


def read_eval_file(path: Path) -> tuple[list[Task], list[tuple[dict[str, Any], str]]]:
    """(generation tasks, chat records for loss) from a jsonl file."""
    if not path.is_file():
        raise SftError(f"eval data not found: {path}")
    tasks, chats = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SftError(f"{where}: invalid JSON: {exc.msg}") from None
        if any(k in record for k in SCORERS):
            tasks.append(parse_task(record, where))
        else:
            chats.append((record, where))
    return tasks, chats


def encode_chats(tok: Any, records: list[tuple[dict[str, Any], str]]) -> list[tuple[Any, Any]]:
    """(ids, labels) per chat record, with the training pipeline's converters and masks."""
    from sft.data.formats import convert_record, detect_format
    from sft.data.masks import Encoder
    from sft.data.templates import Renderer, Template
    from sft.plugins import get_plugins

    plugins = get_plugins()
    encoder = Encoder(tok, Renderer(Template("auto (tokenizer)", tok.chat_template), tok))
    convs = []
    for record, where in records:
        fmt = detect_format(plugins, record, where)
        convs.append(convert_record(plugins, fmt, None, record, where))
    out = []
    for (_, where), enc in zip(records, encoder.encode(convs), strict=True):
        if isinstance(enc, Exception):
            raise SftError(f"{where}: {enc}")
        out.append(enc)
    return out


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
