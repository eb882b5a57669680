"""Core's framework-neutral inference pieces (`sft.inference`, `sft.evalreport.evaluate_cli`),
shared by the torch and MindSpore backends' `sft generate` / `sft chat` / `sft eval`."""

from __future__ import annotations

import io
import json

import pytest
from sft.evalreport import evaluate_cli
from sft.inference import chat_loop, cut_at_eos, saved_eos_ids


@pytest.mark.parametrize(("saved", "want"), [(7, [7]), ([7, 9], [7, 9]), (None, None)])
def test_saved_eos_ids_reads_generation_config(tmp_path, saved, want):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": saved}))
    assert saved_eos_ids(tmp_path) == want


def test_no_generation_config_means_ask_the_tokenizer(tmp_path):
    assert saved_eos_ids(tmp_path) is None


def test_cut_at_eos_stops_at_the_first_end_of_turn_id():
    assert cut_at_eos([5, 6, 9, 7, 8], [7, 9]) == [5, 6]
    assert cut_at_eos([5, 6], [7]) == [5, 6]


def test_chat_loop_keeps_history_and_reset_keeps_the_system_message(monkeypatch, capsys):
    seen: list[list[dict[str, str]]] = []

    def reply(history):
        seen.append([dict(m) for m in history])
        return f"answer {len(seen)}"

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\nMore.\n/reset\n\nAgain.\n/exit\n"))
    chat_loop("model X", reply, system="Be brief.")
    assert [[m["role"] for m in h] for h in seen] == [
        ["system", "user"],
        ["system", "user", "assistant", "user"],
        ["system", "user"],
    ]
    assert seen[1][2]["content"] == "answer 1" and seen[2][1]["content"] == "Again."
    out = capsys.readouterr().out
    assert out.startswith("chatting with model X\n") and out.count("assistant> answer") == 3


def test_evaluate_cli_compares_and_writes_json(tmp_path, capsys):
    def evaluate(model, data, max_new_tokens):
        passed = int(model == "tuned")
        task = {"prompt": "p", "answer": model, "passed": bool(passed), "scorer": "expected"}
        return {"model": model, "tasks": [task], "passed": passed, "total": 1}

    out = tmp_path / "sub" / "eval.json"
    result = evaluate_cli(evaluate, "tuned", tmp_path / "d.jsonl", "base", out, 8)
    assert json.loads(out.read_text()) == result
    assert [result["before"]["model"], result["after"]["model"]] == ["base", "tuned"]
    alone = evaluate_cli(evaluate, "tuned", tmp_path / "d.jsonl", None, None, 8)
    assert list(alone) == ["model"] and "tuned" in capsys.readouterr().out
