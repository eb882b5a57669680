"""`sft eval`: task scoring, held-out loss exactly as training masks it, before/after JSON.

$ .venvs/torch/bin/python -m pytest tests/backends/torch/test_eval.py
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from sft.cli import main
from sft.errors import SftError
from sft_torch.eval import Task, evaluate, read_eval_file, score
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.backends.torch.test_export import trained_run

pytestmark = pytest.mark.torch

CHAT = {
    "messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize(
    "task,answer,passed",
    [
        (Task([], expected="Paris"), "  Paris ", True),
        (Task([], expected="Paris"), "paris", False),
        (Task([], contains=["quill", "SFT"]), "I am Quill, the sft assistant.", True),
        (Task([], contains=["quill", "robot"]), "I am Quill.", False),
        (Task([], regex=r"^Answer: \d+$"), "Answer: 42", True),
        (Task([], regex=r"^Answer: \d+$", contains=["42"]), "Answer: 41", False),
    ],
)
def test_scoring(task, answer, passed):
    assert score(task, answer).passed is passed


def test_eval_file_splits_tasks_from_chats_and_names_bad_lines(tmp_path):
    f = write_jsonl(tmp_path / "e.jsonl", [CHAT, {"prompt": "Who are you?", "contains": "Quill"}])
    tasks, chats = read_eval_file(f)
    assert len(tasks) == 1 and tasks[0].contains == ["Quill"] and len(chats) == 1
    f.write_text('{"prompt": "x", "regex": "("}\n')
    with pytest.raises(SftError, match=r"e.jsonl:1: bad regex"):
        read_eval_file(f)
    f.write_text('{"expected": "x"}\n')
    with pytest.raises(SftError, match=r"e.jsonl:1: .*needs `prompt`"):
        read_eval_file(f)


def test_heldout_loss_scores_assistant_tokens_only(tmp_path, tiny_llama):
    f = write_jsonl(tmp_path / "e.jsonl", [CHAT])
    res = evaluate(str(tiny_llama), f)
    # Independently: render with the template, train on the answer + <|im_end|> only.
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    prompt = tok.apply_chat_template(
        CHAT["messages"][:1], add_generation_prompt=True, tokenize=False
    )
    full = tok.apply_chat_template(CHAT["messages"], tokenize=False)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    start = len(tok(prompt, add_special_tokens=False)["input_ids"])
    end = len(tok(full.rstrip("\n"), add_special_tokens=False)["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    nll = torch.nn.functional.cross_entropy(
        logits[start - 1 : end - 1], torch.tensor(ids[start:end])
    )
    assert res["loss"]["tokens"] == end - start
    assert res["loss"]["loss"] == pytest.approx(float(nll), rel=1e-5)
    assert res["loss"]["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_compare_writes_before_and_after(tmp_path, tiny_llama, capsys):
    run = trained_run(tmp_path, tiny_llama)
    f = write_jsonl(
        tmp_path / "e.jsonl",
        [
            CHAT,
            {"prompt": "Hello!", "regex": "."},
            {"prompt": "Who are you?", "contains": ["a phrase no random model says"]},
        ],
    )
    out = tmp_path / "eval.json"
    rc = main(
        [
            "eval",
            "--model",
            str(run),
            "--data",
            str(f),
            "--compare",
            str(tiny_llama),
            "--json",
            str(out),
            "--max-new-tokens",
            "6",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    for side in ("before", "after"):
        assert res[side]["total"] == 2 and res[side]["tasks"][1]["passed"] is False
        assert res[side]["loss"]["tokens"] > 0
    assert "adapter" in res["after"]["loaded"] and "adapter" not in res["before"]["loaded"]
    # The adapter was trained, so the held-out loss moved.
    assert res["after"]["loss"]["loss"] != res["before"]["loss"]["loss"]
    printed = capsys.readouterr().out
    assert "before / after" in printed and "tasks passed" in printed
