"""The demo's shipped configs and data, as fixtures: every config validates, the held-out prompts
are really held out, and the training answers satisfy the scoring the demo applies (so the
before/after improvement is reachable and honest). The real-model demo itself is `make demo`
(examples/demo/demo.py); its job spec is built here exactly as it builds it, without training.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_demo.py
"""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import pytest
from sft.config import load_config
from sft_torch.eval import Task, read_eval_file, score

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "configs" / "smollm2-135m"


def jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (DEMO / "data" / name).read_text().splitlines()]


@pytest.mark.parametrize("name", ["demo", "lora", "full", "freeze"])
def test_shipped_configs_validate_and_say_how_to_run_them(name):
    path = DEMO / f"{name}.yaml"
    assert path.read_text().startswith("#") and "sft run --config" in path.read_text()
    config = load_config(path, [])
    assert config.model.name_or_path == "smollm2-135m-instruct"
    assert Path(config.data.train[0].path).is_file()


def test_heldout_prompts_are_not_training_questions():
    train_qs = {r["messages"][0]["content"].strip().lower() for r in jsonl("quill_train.jsonl")}
    tasks, chats = read_eval_file(DEMO / "data" / "quill_eval.jsonl")
    held = [t.prompt for t in tasks] + [r["messages"][0]["content"] for r, _ in chats]
    assert len(tasks) >= 10 and len(chats) >= 3
    assert not {q.strip().lower() for q in held} & train_qs
    assert jsonl("quill_heldout.jsonl") == [r for r, _ in chats]


def test_training_answers_have_the_scored_house_format_and_identity():
    answers = [r["messages"][1]["content"] for r in jsonl("quill_train.jsonl")]
    fmt = Task([], regex=r"^Answer: ")
    assert all(score(fmt, a).passed for a in answers)
    assert all(a.endswith("\n— Quill") for a in answers)
    identity = [a for a in answers if re.search(r"\bI am\b|[Mm]y name", a)]
    assert len(identity) >= 15 and all("Quill" in a for a in identity)


def test_make_demo_script_finds_its_config_and_data(monkeypatch, tmp_path):
    """`make demo` runs examples/demo/demo.py: its config, eval file and the job spec it builds
    (with its own overrides and pass-through ones) resolve to the shipped files."""
    monkeypatch.chdir(tmp_path)  # the demo's runs/ directory is relative (and removed on rerun)
    demo = runpy.run_path(str(ROOT / "examples" / "demo" / "demo.py"), run_name="demo")
    assert demo["CONFIG"] == DEMO / "demo.yaml" and demo["EVAL_FILE"].is_file()
    monkeypatch.setattr("sft.run.run", lambda config: config)  # the spec, not the training
    config = demo["train"](["train.epochs=2"])
    assert config.train.epochs == 2 and config.eval.prompts is None
    assert Path(config.data.train[0].path) == DEMO / "data" / "quill_train.jsonl"
    assert config.output_dir == str(demo["RUN_DIR"].resolve())
