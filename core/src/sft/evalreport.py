"""The before/after report of generation tasks and held-out loss: the table `sft eval --compare`
and `sft run` (with `eval.prompts`) print, and `RUN/eval/report.json`.

    write_report(run_dir, before, after)     # RUN/eval/report.json + the table on the console

`before` / `after` are the dicts a backend's `evaluate(model, data, max_new_tokens)` returns:
`{"model", "tasks": [{"prompt", "answer", "passed", ...}], "passed", "total", "loss"?}`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sft.rundir import EVAL_REPORT


def write_report(run_dir: Path, before: dict[str, Any], after: dict[str, Any]) -> Path:
    """Write RUN/eval/report.json (`{"before": ..., "after": ...}`), print the comparison and
    return the path."""
    out = Path(run_dir) / EVAL_REPORT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"before": before, "after": after}, indent=2))
    print_comparison(before, after)
    return out


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _loss_line(res: dict[str, Any]) -> str:
    loss = res.get("loss") or {}
    if not loss:
        return ""
    return f"loss {loss['loss']:.3f}, perplexity {loss['perplexity']:.2f} ({loss['tokens']} tokens)"


def print_single(res: dict[str, Any]) -> None:
    """One model's results: a task table, pass count and loss."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    if res["tasks"]:
        table = Table("prompt", "answer", "pass", title=f"sft eval: {res['model']}")
        for t in res["tasks"]:
            table.add_row(_short(t["prompt"], 40), _short(t["answer"], 90), _mark(t["passed"]))
        console.print(table)
        console.print(f"passed {res['passed']}/{res['total']}")
    if res.get("loss"):
        console.print(_loss_line(res))


def _mark(passed: bool) -> str:
    return "[green]pass[/]" if passed else "[red]fail[/]"


def print_comparison(before: dict[str, Any], after: dict[str, Any]) -> None:
    """The before/after table: per task the base answer and the tuned answer, pass/fail, and
    totals (tasks passed, held-out loss and perplexity)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=180)
    table = Table(
        "prompt", "before", "", "after", "", title="sft eval: before / after", show_lines=True
    )
    for b, a in zip(before["tasks"], after["tasks"], strict=True):
        table.add_row(
            _short(b["prompt"], 36),
            _short(b["answer"], 60),
            _mark(b["passed"]),
            _short(a["answer"], 60),
            _mark(a["passed"]),
        )
    if before["tasks"]:
        console.print(table)
    console.print(
        f"tasks passed: before {before['passed']}/{before['total']}  ->  "
        f"after {after['passed']}/{after['total']}"
    )
    if before.get("loss") and after.get("loss"):
        console.print(
            f"held-out loss: before {_loss_line(before)}\n               after  {_loss_line(after)}"
        )


def evaluate_cli(
    evaluate: Callable[[str, Path, int], dict[str, Any]],
    model: str,
    data: Path,
    compare: str | None,
    json_out: Path | None,
    max_new_tokens: int,
) -> dict[str, Any]:
    """`sft eval` with a backend's `evaluate(model, data, max_new_tokens)`: evaluate (and
    compare), print the table(s), write JSON if asked."""
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
