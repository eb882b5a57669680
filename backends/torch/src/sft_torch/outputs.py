"""The final weights of a run, in formats plain transformers + peft load.

    RUN/final/   LoRA / QLoRA: a PEFT adapter directory (adapter_config.json,
                 adapter_model.safetensors) whose base_model_name_or_path is the local base dir;
                 full / freeze: a complete safetensors model directory (config.json,
                 model.safetensors).
                 Always: the tokenizer with the chat template used in training, and a
                 generation_config.json whose eos_token_id lists the template's end-of-turn ids.

    outputs = save_final(model, plan)   # {"adapter": ".../final", "tokenizer": ".../final"}

Load an adapter back with `AutoPeftModelForCausalLM.from_pretrained(RUN/final)` or
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), RUN/final)`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sft.backend import TrainPlan
from sft.rundir import final_dir

from sft_torch.model import causal_lm


def is_adapter(model: Any) -> bool:
    return callable(getattr(model, "get_base_model", None))


def generation_config(model: Any, plan: TrainPlan) -> Any:
    """The model's generation config with EOS = the template's end-of-turn tokens, so the
    fine-tuned model stops after its answer."""
    from transformers import GenerationConfig

    lm = causal_lm(model)
    base = getattr(lm, "generation_config", None) or GenerationConfig()
    gen = GenerationConfig.from_dict(base.to_dict())
    eos = list(dict.fromkeys(plan.data.eos_ids)) or (
        [lm.config.eos_token_id] if lm.config.eos_token_id is not None else []
    )
    gen.eos_token_id = eos
    gen.pad_token_id = plan.data.pad_id
    return gen


def save_tokenizer(plan: TrainPlan, out: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        plan.data.tokenizer_dir, trust_remote_code=plan.config.model.trust_remote_code
    )
    tok.save_pretrained(str(out))
    # Some templates live in a separate file next to the tokenizer; keep it with the weights.
    src = Path(plan.data.tokenizer_dir) / "chat_template.jinja"
    if src.is_file() and not (out / "chat_template.jinja").exists():
        shutil.copy(src, out / "chat_template.jinja")


def save_final(model: Any, plan: TrainPlan) -> dict[str, str]:
    """Write RUN/final (see module docstring); returns the named output paths."""
    out = final_dir(plan.run_dir)
    if out.exists():
        shutil.rmtree(out)  # a rerun (e.g. after a resume) replaces the previous result
    out.mkdir(parents=True)
    gen = generation_config(model, plan)
    if is_adapter(model):
        model.save_pretrained(str(out), safe_serialization=True)
        kind = "adapter"
    else:
        lm = causal_lm(model)
        lm.config.use_cache = True  # the saved model is for inference
        lm.generation_config = gen
        lm.save_pretrained(str(out), safe_serialization=True)
        kind = "model"
    gen.save_pretrained(str(out))
    save_tokenizer(plan, out)
    return {kind: str(out), "tokenizer": str(out), "base_model": str(plan.model.path)}
