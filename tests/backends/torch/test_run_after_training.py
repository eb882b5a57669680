"""What `sft run` does after training, from the spec alone: `eval.prompts` scored before and
after (RUN/eval/report.json), `export.formats` made and verified through `sft export`'s code
path, and a failing export failing the run only after the trained weights are saved.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_run_after_training.py -q
"""

from __future__ import annotations

import json

import pytest
import yaml
from sft.config import load_config
from sft.errors import SftError
from sft.hookspecs import hookimpl
from sft.plugins import Plugins
from sft.run import run

from tests.backends.torch.test_sft_run import write_job

pytestmark = [pytest.mark.torch, pytest.mark.slow]


def job_with(tmp_path, model, **extra):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "What is the capital of France?", "contains": ["Paris"]})
        + "\n"
        + json.dumps({"prompt": "Hello!", "regex": "Hello"})
        + "\n"
    )
    path = write_job(tmp_path, model)
    job = yaml.safe_load(path.read_text())
    job["train"]["max_steps"] = 2
    job.pop("checkpoint")
    job["eval"] = {"prompts": str(prompts), "max_new_tokens": 4}
    job.update(extra)
    path.write_text(yaml.safe_dump(job))
    return path


def test_prompts_and_exports_after_training(tmp_path, tiny_llama, capsys):
    job = job_with(tmp_path, tiny_llama, export={"formats": ["hf", "gguf"], "dtype": "q8_0"})
    summary = run(load_config(job))
    run_dir = tmp_path / "run"
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert [t["prompt"] for t in report["before"]["tasks"]] == [
        "What is the capital of France?",
        "Hello!",
    ]
    assert report["before"]["model"] == str(tiny_llama)  # the base model, before training
    assert report["after"]["model"] == str(run_dir)
    assert "before" in capsys.readouterr().out  # the before/after table on the console
    outputs = summary["outputs"]
    assert outputs["eval_report"] == str(run_dir / "eval" / "report.json")
    hf = json.loads((run_dir / "exports" / "hf" / "export-hf.json").read_text())
    assert hf["ok"] and hf["checks"]["dtype"] == "f16"  # q8_0 is for gguf; hf in f16
    gguf = json.loads((run_dir / "exports" / "gguf" / "export-gguf.json").read_text())
    assert gguf["ok"] and gguf["checks"]["dtype"] == "q8_0"
    assert outputs["export_gguf"] == gguf["path"] and outputs["export_hf"] == hf["path"]
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["outputs"]["export_gguf"] == gguf["path"]


class Broken:
    @hookimpl
    def sft_register_exporters(self, register):
        def fail(request):
            raise SftError("disk full while writing the export")

        register("broken", fail, description="always fails (test)")


def test_failed_export_fails_the_run_after_the_weights_are_saved(tmp_path, tiny_llama, monkeypatch):
    plugins = Plugins(extra=(Broken(),))
    monkeypatch.setattr("sft.plugins.get_plugins", lambda: plugins)
    job = job_with(tmp_path, tiny_llama, export={"formats": ["broken"]})
    job_data = yaml.safe_load(job.read_text())
    job_data["eval"] = {}
    job.write_text(yaml.safe_dump(job_data))
    with pytest.raises(SftError) as info:
        run(load_config(job, plugins=plugins), plugins)
    run_dir = tmp_path / "run"
    assert "disk full" in str(info.value) and "sft export" in str(info.value)
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
