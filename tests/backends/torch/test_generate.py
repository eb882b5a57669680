"""`sft generate` / `sft chat`: decoding stops at the run's end-of-turn ids (tiny models).

$ .venvs/torch/bin/python -m pytest tests/backends/torch/test_generate.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sft.cli import main
from sft_torch.generate import Sampling, generate_ids, load_for_inference, render_prompt

pytestmark = pytest.mark.torch

MESSAGES = [{"role": "user", "content": "Tell me a joke about cats."}]


def with_eos(tmp_path: Path, model_dir: Path, eos: list[int]) -> Path:
    """A copy of `model_dir` whose generation_config.json stops at `eos`."""
    out = tmp_path / "model"
    shutil.copytree(model_dir, out)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return out


def test_generation_stops_at_the_first_end_of_turn_id(tmp_path, tiny_llama):
    # The random model never chooses <|im_end|> by itself, so take its own greedy continuation
    # and declare the token it emits 4th to be the end of turn: decoding must stop right there.
    free = load_for_inference(tiny_llama)
    free.eos_ids = [10**6]  # an id that never occurs: no stopping
    prompt = render_prompt(free.tokenizer, MESSAGES)
    continuation = generate_ids(free, [prompt], Sampling(max_new_tokens=12))[0]
    assert len(continuation) == 12
    stop = continuation[3]
    first = continuation.index(stop)
    loaded = load_for_inference(with_eos(tmp_path, tiny_llama, [stop]))
    assert loaded.eos_ids == [stop]
    out = generate_ids(loaded, [prompt], Sampling(max_new_tokens=12))[0]
    assert out == continuation[:first]


def test_batched_generation_matches_one_by_one(tiny_qwen2):
    loaded = load_for_inference(tiny_qwen2)
    loaded.eos_ids = [10**6]
    prompts = [
        render_prompt(loaded.tokenizer, [{"role": "user", "content": t}])
        for t in ("Hello!", "What is the capital of France? Answer briefly.")
    ]
    together = generate_ids(loaded, prompts, Sampling(max_new_tokens=6))
    alone = [generate_ids(loaded, [p], Sampling(max_new_tokens=6))[0] for p in prompts]
    assert together == alone


def test_generate_command_prints_an_answer(tmp_path, tiny_llama, capsys):
    model = with_eos(tmp_path, tiny_llama, [2])
    assert main(["generate", str(model), "--prompt", "Hello!", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_chat_keeps_history(tmp_path, tiny_llama, monkeypatch, capsys):
    seen: list[list[dict[str, str]]] = []
    import sft_torch.generate as gen

    real = gen.render_prompt

    def spy(tok, messages):
        seen.append([dict(m) for m in messages])
        return real(tok, messages)

    monkeypatch.setattr(gen, "render_prompt", spy)
    lines = iter(["Hello!", "Tell me a joke.", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    model = with_eos(tmp_path, tiny_llama, [2])
    assert main(["chat", str(model), "--max-new-tokens", "4", "--system", "Be brief."]) == 0
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]
    assert seen[1][1]["content"] == "Hello!" and capsys.readouterr().out.count("assistant>") == 2


@pytest.mark.parametrize("layout", ["final/model", "final"])  # "final": a run of sft 0.1.0
def test_a_run_dir_loads_its_model_with_the_eos_saved_next_to_it(tmp_path, tiny_llama, layout):
    weights = tmp_path / "run" / layout
    shutil.copytree(tiny_llama, weights)
    (weights / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    loaded = load_for_inference(tmp_path / "run")
    assert loaded.source == f"model {weights}"
    assert loaded.eos_ids == [7, 9] and loaded.info["tokenizer_dir"] == weights


def test_a_lora_run_dir_loads_final_adapter_onto_the_base_of_its_config(tmp_path, tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    adapter = run / "final" / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    for f in tiny_llama.iterdir():  # the tokenizer and its chat template, as save_final does
        if f.name != "config.json" and f.suffix != ".safetensors":
            shutil.copy(f, adapter / f.name)
    (adapter / "generation_config.json").write_text(json.dumps({"eos_token_id": [5]}))
    (run / "config.yaml").write_text(f"model: {{name_or_path: {tiny_llama}}}\n")
    loaded = load_for_inference(run)
    assert loaded.source == f"adapter {adapter} on base {tiny_llama}"
    assert loaded.eos_ids == [5] and loaded.info["tokenizer_dir"] == adapter
