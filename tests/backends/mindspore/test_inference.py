"""Inference without torch (issue #21, item 5): on a MindSpore run, `eval.prompts`, `sft generate`,
`sft chat` and `sft eval` run in the MindSpore environment with MindFormers' generation and the
run's chat template and end-of-turn ids, and give the torch environment's greedy answers and
held-out loss on the same weights (the exported HF model, or the base model before training).

One `sft run --backend mindspore` (LoRA, 2 steps, with `data.eval` every step and
`eval.prompts`) is the fixture; the torch side runs the torch backend's own `evaluate` with
$SFT_TORCH_PYTHON.

    $ SFT_TORCH_PYTHON=.venvs/torch/bin/python .venvs/ms/bin/python -m pytest \\
          tests/backends/mindspore/test_inference.py
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("mindspore")

from sft.cli import main

from tests.backends.mindspore.conftest import torch_python

pytestmark = [pytest.mark.mindspore, pytest.mark.slow]

REL = 1e-5
NEW = 8
CHATS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Tell me a joke about cats.", "Cats jump over the lazy dog."),
    ("Translate to German: good morning.", "Guten Morgen."),
    ("Write a haiku about the sea.", "Waves fold into foam, salt wind carries gull voices."),
]
PROMPTS = [
    {"prompt": "What is the capital of France?", "contains": ["Paris"]},
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Tell me a joke about cats."},
        ],
        "regex": "Cats",
    },
    # a chat record: scored for held-out loss
    {
        "messages": [
            {"role": "user", "content": "Hello! How can I help you today?"},
            {"role": "assistant", "content": "Tell me a joke about cats."},
        ]
    },
]


def _messages(q: str, a: str) -> str:
    return json.dumps(
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("inference")
    (root / "chat.jsonl").write_text("\n".join(_messages(q, a) for q, a in CHATS) + "\n")
    (root / "held.jsonl").write_text(_messages(*CHATS[0]) + "\n" + _messages(*CHATS[3]) + "\n")
    (root / "prompts.jsonl").write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    (root / "job.yaml").write_text(
        "backend: mindspore\n"
        f"model: {tiny_llama}\n"
        f"data: {{train: {root / 'chat.jsonl'}, eval: {root / 'held.jsonl'}, max_seq_len: 128}}\n"
        "method: {name: lora, r: 8, alpha: 16, dropout: 0.0}\n"
        "train: {max_steps: 2, micro_batch_size: 2, learning_rate: 0.02, warmup_steps: 0}\n"
        f"eval: {{every_steps: 1, prompts: {root / 'prompts.jsonl'}, max_new_tokens: {NEW}}}\n"
        "logging: {plot: false}\n"
        f"output_dir: {root / 'run'}\n"
        "mindspore: {device_target: CPU, threads: 1}\n"
    )
    assert main(["run", "--config", str(root / "job.yaml")]) == 0
    return root


@pytest.fixture(scope="module")
def torch_results(run, tiny_llama):
    """The torch backend's `evaluate` of the base model and of the run's exported HF model."""
    exe = torch_python()
    work = run / "torch"
    work.mkdir()
    models = [str(tiny_llama), str(run / "run" / "final" / "model")]
    jobs = [{"model": m, "data": str(run / "prompts.jsonl"), "max_new_tokens": NEW} for m in models]
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    repo = Path(__file__).resolve().parents[3]
    # this checkout's sft, sft_torch and plugins, whatever the venv's editable installs point at
    dirs = [repo / "core/src", repo / "backends/torch/src", *sorted(repo.glob("plugins/*/src"))]
    env["PYTHONPATH"] = os.pathsep.join(str(d) for d in dirs)
    env["OMP_NUM_THREADS"] = "1"
    script = Path(__file__).with_name("torch_eval.py")
    cmd = [exe, str(script), str(work / "jobs.json"), str(work / "out.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = json.loads((work / "out.json").read_text())
    return before, after


def _same(ms: dict, torch: dict) -> None:
    assert [t["answer"] for t in ms["tasks"]] == [t["answer"] for t in torch["tasks"]]
    assert [t["passed"] for t in ms["tasks"]] == [t["passed"] for t in torch["tasks"]]
    assert ms["loss"]["tokens"] == torch["loss"]["tokens"]
    assert abs(ms["loss"]["loss"] - torch["loss"]["loss"]) <= REL * torch["loss"]["loss"]


def test_eval_prompts_of_a_mindspore_run_equal_torch(run, torch_results):
    report = json.loads((run / "run" / "eval" / "report.json").read_text())
    before, after = torch_results
    assert all(t["answer"] for t in report["after"]["tasks"])  # something was generated
    _same(report["before"], before)
    _same(report["after"], after)
    assert report["before"]["loss"]["loss"] != report["after"]["loss"]["loss"]  # it trained


def test_eval_rows_in_a_real_run(run):
    rows = [json.loads(x) for x in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [1, 2]
    summary = json.loads((run / "run" / "summary.json").read_text())
    assert summary["metrics"]["eval_loss"] == [r for r in rows if "eval_loss" in r][-1]["eval_loss"]


def test_sft_generate_and_chat_equal_torch(run, torch_results, capsys, monkeypatch):
    _, after = torch_results
    want = after["tasks"][1]["answer"]  # the task with a system message
    system, user = (m["content"] for m in PROMPTS[1]["messages"])
    args = ["--system", system, "--max-new-tokens", str(NEW)]
    assert main(["generate", str(run / "run"), "-p", user, *args]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == want
    monkeypatch.setattr("sys.stdin", io.StringIO(user + "\n/exit\n"))
    assert main(["chat", str(run / "run"), *args]) == 0
    assert f"assistant> {want}" in capsys.readouterr().out


def test_sft_eval_equals_torch(run, torch_results, tmp_path):
    _, after = torch_results
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(run / "run"), "--data", str(run / "prompts.jsonl")]
    assert main([*args, "--max-new-tokens", str(NEW), "--json", str(out)]) == 0
    _same(json.loads(out.read_text())["model"], after)
