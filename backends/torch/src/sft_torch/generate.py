"""Try a model: load a finished run (or any model) and generate with its own chat template.

    $ sft generate runs/smollm2-135m-demo --prompt "Who are you?"
    $ sft generate smollm2-135m-instruct --prompt "Who are you?" --temperature 0.7
    $ sft chat runs/smollm2-135m-demo          # interactive; history kept; /reset, /exit

A run directory's `final/` holds a PEFT adapter in final/adapter/ (loaded onto the base named in
the run's `config.yaml`) and/or a full model in final/model/ (`sft.rundir`; an older torch run's
final/ itself is read too). Next to the weights: the tokenizer with the chat template used in
training and `generation_config.json` whose eos ids end an assistant turn. Decoding stops at
those ids, so a fine-tuned model stops where it was taught to. What is not torch's (sampling
settings, prompt, eos cut, chat loop) is core's `sft.inference`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sft.errors import SftError
from sft.inference import Sampling, cut_at_eos, decode_answer, render_prompt, saved_eos_ids
from sft.inference import chat_loop as core_chat_loop
from sft.models import resolve_model
from sft.rundir import config_path, find_final_weights


@dataclass
class Loaded:
    """A model ready for inference and what it was loaded from."""

    model: Any
    tokenizer: Any
    eos_ids: list[int]
    source: str
    """What was loaded, for people: "adapter X on base Y", "model X"."""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunWeights:
    """Where a finished run keeps its weights."""

    final: Path
    """RUN/final (its parent is the run directory)."""
    kind: str
    """`adapter` (PEFT) or `model` (full safetensors)."""
    weights: Path
    """The adapter or model directory (final/adapter, final/model; an older torch run: final/).
    The tokenizer, chat template and generation_config.json live here too."""


def find_run_weights(path: Path) -> RunWeights | None:
    """The weights of a run directory (or of its final/ dir); None for anything else. An
    adapter wins over a full model: it loads onto the base the run trained."""
    found = find_final_weights(path)
    if found is None:
        return None
    kind = "adapter" if found.adapter is not None else "model"
    return RunWeights(found.final, kind, found.weights)


def run_base_spec(weights: RunWeights) -> str:
    """The base model of an adapter run: `model.name_or_path` of the run's resolved
    config.yaml, else the adapter's own `base_model_name_or_path`."""
    cfg_path = config_path(weights.final.parent)
    if cfg_path.is_file():
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        model = cfg.get("model") or {}
        spec = model.get("name_or_path") if isinstance(model, dict) else model
        if spec:
            return str(spec)
    adapter_cfg = json.loads((weights.weights / "adapter_config.json").read_text())
    if adapter_cfg.get("base_model_name_or_path"):
        return str(adapter_cfg["base_model_name_or_path"])
    raise SftError(
        f"cannot tell the base model of the adapter in {weights.weights}: no config.yaml in "
        "the run directory and no base_model_name_or_path in adapter_config.json"
    )


def tokenizer_dir(weights: RunWeights) -> Path:
    """Where a run saved its tokenizer: next to the weights, else in final/ itself."""
    for cand in (weights.weights, weights.final):
        if (cand / "tokenizer_config.json").is_file():
            return cand
    raise SftError(f"no tokenizer (tokenizer_config.json) in {weights.final}")


def eos_ids_of(directory: Path, tokenizer: Any) -> list[int]:
    """eos ids from `generation_config.json` in `directory`, else the tokenizer's end of turn."""
    from sft_torch.model_sources import end_of_turn_ids

    saved = saved_eos_ids(directory)
    return saved if saved is not None else end_of_turn_ids(tokenizer)


def load_base(path: Path, dtype: Any = None) -> Any:
    """A causal LM from an HF directory, safetensors only, float32 unless `dtype` is given."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype or torch.float32, use_safetensors=True
    )


def load_for_inference(target: str | Path, dtype: Any = None, merge: bool = False) -> Loaded:
    """Load a run directory (adapter or full model), an HF directory, a .gguf file or a built-in
    name, in eval mode (float32 unless `dtype` says otherwise)."""
    from transformers import AutoTokenizer

    path = Path(target).expanduser()
    run = find_run_weights(path) if path.is_dir() else None
    if run is None:
        base = resolve_model(str(target)).path
        model, tok_dir, meta_dir, src = load_base(base, dtype), base, base, f"model {base}"
    elif run.kind == "adapter":
        from peft import PeftModel

        base = resolve_model(run_base_spec(run)).path
        model = PeftModel.from_pretrained(load_base(base, dtype), str(run.weights))
        if merge:
            model = model.merge_and_unload()
        tok_dir = meta_dir = tokenizer_dir(run)
        src = f"adapter {run.weights} on base {base}"
    else:
        model = load_base(run.weights, dtype)
        tok_dir = meta_dir = tokenizer_dir(run)
        src = f"model {run.weights}"
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model.eval()
    info = {"run": run, "meta_dir": meta_dir, "tokenizer_dir": tok_dir}
    return Loaded(model, tok, eos_ids_of(meta_dir, tok), src, info)


def generate_ids(loaded: Loaded, prompts: list[list[int]], sampling: Sampling) -> list[list[int]]:
    """New token ids for each prompt (batched, left padded), cut at the first eos id."""
    import torch

    tok, model = loaded.tokenizer, loaded.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else loaded.eos_ids[0]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(sampling.seed)
    kwargs: dict[str, Any] = {"do_sample": sampling.temperature > 0}
    if sampling.temperature > 0:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=loaded.eos_ids,
            pad_token_id=pad,
            **kwargs,
        )
    return [cut_at_eos(row[width:].tolist(), loaded.eos_ids) for row in out]


def reply(loaded: Loaded, messages: list[dict[str, str]], sampling: Sampling) -> str:
    """The assistant's next message for a conversation."""
    new = generate_ids(loaded, [render_prompt(loaded.tokenizer, messages)], sampling)[0]
    return decode_answer(loaded.tokenizer, new)


def chat_loop(loaded: Loaded, sampling: Sampling, system: str | None = None) -> None:
    """Core's chat loop (`sft.inference.chat_loop`) answered by this model."""
    core_chat_loop(loaded.source, lambda history: reply(loaded, history, sampling), system)
