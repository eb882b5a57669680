"""RUN/final loads with plain peft + transformers in a fresh process and reproduces the in-run
model's logits; it carries the tokenizer, chat template and the template's EOS ids.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_outputs.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from sft_torch.train import Trainer, fit

from tests.backends.torch.conftest import events_for, make_plan

pytestmark = pytest.mark.torch

# Runs in a fresh interpreter: nothing from sft, only the libraries a user would have.
RELOAD = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    torch.set_num_threads(1)
    ids = torch.from_numpy(np.load(sys.argv[1]))
    report = []
    for final, kind, out_path in json.loads(sys.argv[2]):
        if kind == "adapter":
            from peft import PeftModel
            base = json.load(open(final + "/adapter_config.json"))["base_model_name_or_path"]
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final)
        else:
            model = AutoModelForCausalLM.from_pretrained(final)
        model.eval()
        with torch.no_grad():
            np.save(out_path, model(input_ids=ids).logits.numpy())
        tok = AutoTokenizer.from_pretrained(final)
        gen = GenerationConfig.from_pretrained(final)
        report.append({"template": tok.chat_template, "eos": gen.eos_token_id,
                       "im_end": tok.convert_tokens_to_ids("<|im_end|>")})
    print(json.dumps(report))
""")


@pytest.mark.slow
def test_final_weights_reload_in_a_fresh_process(tmp_path, tiny_llama):
    ids = torch.tensor([[5, 17, 42, 99, 7, 2, 60, 61]])
    np.save(tmp_path / "ids.npy", ids.numpy())
    jobs, in_run = [], {}
    for method, kind in (("lora", "adapter"), ("full", "model")):
        plan = make_plan(tmp_path / method, tiny_llama, method=method, train={"max_steps": 3})
        trainer = Trainer(plan, events_for(plan))
        result = fit(trainer)
        assert result.outputs["tokenizer"] == result.outputs[kind]
        trainer.model.eval()
        with torch.no_grad():
            in_run[kind] = trainer.model(input_ids=ids).logits.numpy()
        jobs.append((result.outputs[kind], kind, str(tmp_path / f"{kind}.npy")))
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path / "ids.npy"), json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for (_, kind, path), info in zip(jobs, report, strict=True):
        assert np.abs(np.load(path) - in_run[kind]).max() < 1e-4, kind
        assert "<|im_start|>" in info["template"]
        assert info["eos"] == [info["im_end"]] == plan.data.eos_ids
