"""sft specs equivalent to MindFormers' reference finetune configs (tests/backends/mindspore/golden/),
and the generated MindFormers YAML for each, flattened to dotted keys for a key-by-key comparison.

    $ .venvs/ms/bin/python tests/backends/mindspore/golden_cases.py   # prints every difference
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

GOLDEN = Path(__file__).with_name("golden")

#: config.json of the Hugging Face checkpoints (only the keys sft reads).
HF_CONFIGS = {
    "llama2-7b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
}

QWEN_FULL = """\
method: full
data: {{train: d.jsonl, max_seq_len: 8192}}
train: {{epochs: 2, micro_batch_size: 1, gradient_accumulation_steps: 8, learning_rate: 1.0e-6,
        min_lr_ratio: 1.0, warmup_ratio: 0.0, betas: [0.9, 0.95], eps: 1.0e-8,
        weight_decay: 0.01, max_grad_norm: 1.0, precision: bf16, seed: 42,
        gradient_checkpointing: true}}
parallel: {{nproc_per_node: 8, nnodes: {nnodes}, pipeline_parallel: 2}}
checkpoint: {{every_steps: 5000, keep_last: 1}}
mindspore: {{device_target: Ascend, device_kind: 910B}}
"""

#: name -> (model, reference YAML, sft spec, sequence length)
CASES = {
    "llama2-7b-lora-8cards": (
        "llama2-7b",
        "lora_llama2_7b.yaml",
        """\
method: {name: lora, r: 16, alpha: 16, dropout: 0.05, target_modules: [q_proj, k_proj, v_proj, o_proj]}
data: {train: d.jsonl, max_seq_len: 4096}
train: {epochs: 2, micro_batch_size: 2, learning_rate: 1.0e-5, warmup_ratio: 0.03,
        min_lr_ratio: 0.0, max_grad_norm: 1.0, precision: bf16, seed: 0}
parallel: {nproc_per_node: 8}
checkpoint: {every_steps: 100}
mindspore: {device_target: Ascend, device_kind: 910B}
""",
        4096,
    ),
    "qwen2.5-7b-full-8cards": (
        "qwen2.5-7b",
        "finetune_qwen2_5_7b_8k.yaml",
        QWEN_FULL.format(nnodes=1),
        8192,
    ),
    "qwen2.5-7b-full-2x8cards": (
        "qwen2.5-7b",
        "finetune_qwen2_5_7b_8k.yaml",
        QWEN_FULL.format(nnodes=2),
        8192,
    ),
}


def flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf}; lists of mappings are indexed (callbacks.1.type), other lists are leaves."""
    if isinstance(doc, dict):
        out: dict[str, Any] = {}
        for k, v in doc.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out if doc else {prefix[:-1]: {}}
    if isinstance(doc, list) and doc and all(isinstance(x, dict) for x in doc):
        out = {}
        for i, v in enumerate(doc):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: doc}


def reference(name: str) -> dict[str, Any]:
    return yaml.safe_load((GOLDEN / CASES[name][1]).read_text())


def generate(name: str, tmp: Path) -> dict[str, Any]:
    """sft's MindFormers YAML for case `name` (an Ascend run planned on this machine)."""
    from sft.config import load_config
    from sft.data.cache import IGNORE_INDEX, PreparedData, TokenizedSplit
    from sft.models import load_resolved
    from sft_mindspore import runtime
    from sft_mindspore.data import build_schedule
    from sft_mindspore.mfconfig import build_yaml
    from sft_mindspore.plugin import MindSporeOptions

    model_name, _, spec, seq = CASES[name]
    model = tmp / model_name
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(HF_CONFIGS[model_name]))
    (tmp / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp / "c.yaml").write_text(
        f"backend: mindspore\nmodel: {model}\noutput_dir: {tmp / 'run'}\n" + spec
    )
    cfg = load_config(tmp / "c.yaml")
    opts = MindSporeOptions.model_validate(cfg.options)
    rows = 16 * cfg.train.micro_batch_size * cfg.train.accumulation(cfg.parallel.world_size) * 2
    split = TokenizedSplit.from_samples([([5] * seq, [IGNORE_INDEX] + [5] * (seq - 1))] * rows)
    data = PreparedData(tmp / "cache", "golden", split, None, str(model), 0, [2])
    from sft.backend import TrainPlan

    plan = TrainPlan(cfg, opts, tmp / "run", load_resolved(model, str(model)), data)
    schedule = build_schedule(split, cfg, cfg.parallel.world_size)
    settings = runtime.resolve(cfg, opts, "Ascend")
    return build_yaml(
        plan, schedule, "init.ckpt", "train.mindrecord", "Ascend", "./output", settings
    )


def differences(name: str, tmp: Path) -> dict[str, tuple[Any, Any]]:
    """{key: (reference value, sft value)} for every key whose value differs or that only one
    side has (a missing side is `<absent>`)."""
    ref, ours = flatten(reference(name)), flatten(generate(name, tmp))
    absent = "<absent>"
    out = {}
    for key in sorted(set(ref) | set(ours)):
        a, b = ref.get(key, absent), ours.get(key, absent)
        if a != b:
            out[key] = (a, b)
    return out


if __name__ == "__main__":
    import tempfile

    for case in CASES:
        with tempfile.TemporaryDirectory() as d:
            print(f"== {case}")
            for key, (a, b) in differences(case, Path(d)).items():
                print(f"  {key}: reference {a!r} | sft {b!r}")
