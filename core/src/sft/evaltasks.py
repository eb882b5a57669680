"""Generation tasks and held-out chat records of an eval file, framework-free: what `sft eval`
and `eval.prompts` read and how answers are scored, shared by every backend's `evaluate`.

`--data` / `eval.prompts` is a jsonl file. A record with `expected`, `contains` or `regex` is a
generation task: its `prompt` (a string) or `messages` (without the answer) is answered greedily
and scored:

    {"prompt": "Who are you?", "contains": ["Quill"]}                 all substrings, any case
    {"prompt": "2+2?", "expected": "4"}                                exact match (trimmed)
    {"messages": [...], "regex": "^Quill:"}                            re.search

Every other record is a chat sample in any format the data pipeline reads (messages, sharegpt,
alpaca, prompt/completion); `encode_chats` tokenizes and masks it exactly as training does
(sft.data.encoder), for a backend to score its assistant tokens (loss and perplexity).

    tasks, chats = read_eval_file(path)
    result = score(tasks[0], answer)
    report = evaluate_file(model, path, load, chat_loss, answer)   # what `evaluate` returns
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sft.errors import SftError

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
    from sft.data.encoder import Encoder
    from sft.data.formats import convert_record, detect_format
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


def run_tasks(
    tok: Any,
    tasks: list[Task],
    generate: Callable[[list[list[int]]], list[list[int]]],
    batch: int = 8,
) -> list[TaskResult]:
    """Every task answered (`generate`: the new ids of each prompt, greedy, cut at end of turn;
    up to `batch` prompts a call) and scored."""
    from sft.inference import decode_answer, render_prompt

    results = []
    for i in range(0, len(tasks), batch):
        chunk = tasks[i : i + batch]
        prompts = [render_prompt(tok, t.messages) for t in chunk]
        for task, new in zip(chunk, generate(prompts), strict=True):
            results.append(score(task, decode_answer(tok, new)))
    return results


def evaluate_file(
    model: str,
    data: Path,
    load: Callable[[str], Any],
    chat_loss: Callable[[Any, list[tuple[Any, Any]]], dict[str, float]],
    answer: Callable[[Any, list[Task]], list[TaskResult]],
) -> dict[str, Any]:
    """One model on one eval file, as the JSON-able dict every backend's `evaluate` returns:
    `load(model)` gives an object with `.tokenizer` and `.source`; `chat_loss(loaded, samples)`
    scores the chat samples, `answer(loaded, tasks)` the generation tasks."""
    tasks, chats = read_eval_file(data)
    if not tasks and not chats:
        raise SftError(f"{data} has no records")
    loaded = load(model)
    out: dict[str, Any] = {"model": model, "loaded": loaded.source, "data": str(data)}
    if chats:
        out["loss"] = chat_loss(loaded, encode_chats(loaded.tokenizer, chats))
    results = answer(loaded, tasks) if tasks else []
    out["tasks"] = [asdict(r) for r in results]
    out["passed"] = sum(r.passed for r in results)
    out["total"] = len(results)
    return out
