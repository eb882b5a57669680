"""The architecture matrix: which decoder-only model types each backend and export format has
been verified on, and why the others are refused. One table feeds `sft models --architectures`,
docs/models.md (tests/core/test_archs_table.py keeps them equal) and the warning `sft run`
prints for a model type outside the matrix.

    $ sft models --architectures

The torch column is earned by tests/backends/torch/test_archs.py (tiny random models of each
architecture, tests/archs.py): packed == unpacked loss and gradients, the levers equal plain
peft, full / LoRA / freeze train; resume, the merged HF and adapter exports and the GGUF export
on the architectures marked so.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

VERIFIED = "verified"


@dataclass(frozen=True)
class Arch:
    quirks: str
    """What the tiny test model keeps of the architecture."""
    torch: str = VERIFIED
    mindspore: str = (
        "refused at validation: MindFormers' legacy LlamaForCausalLM takes llama, qwen2"
    )
    gguf: str = VERIFIED


_MS_OK = "verified (first-step parity with torch: tests/backends/mindspore)"

ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch(
        "untied head, llama3 rope scaling",
        mindspore=_MS_OK,
        gguf="refused: llama3 rope scaling needs llama.cpp's rope_freqs tensor "
        "(plain llama rope exports)",
    ),
    "qwen2": Arch("tied embeddings, q/k/v biases", mindspore=_MS_OK),
    "qwen3": Arch("tied embeddings, q/k norm"),
    "qwen3_moe": Arch("4 experts, top-2, q/k norm", gguf="refused: llama.cpp stacks the experts"),
    "mistral": Arch(
        "sliding window 4",
        gguf="verified without a sliding window; refused with one (llama.cpp's llama graph "
        "has none)",
    ),
    "mixtral": Arch("4 experts, top-2", gguf="refused: llama.cpp stacks the experts"),
    "gemma": Arch(
        "tied, scaled embeddings, head_dim 16", gguf="refused: llama.cpp stores norms as 1 + w"
    ),
    "gemma2": Arch(
        "sliding window, attention and final logit soft-capping (eager attention)",
        gguf="refused: llama.cpp stores norms as 1 + w",
    ),
    "gemma3_text": Arch(
        "sliding + full layers, q/k norm", gguf="refused: llama.cpp stores norms as 1 + w"
    ),
    "phi3": Arch("fused qkv and gate_up", gguf="refused: fused qkv, rope-factor tensors"),
    "olmo2": Arch("q/k norm, post-norms", gguf="refused: olmo2 post-norm names"),
    "granite": Arch(
        "embedding/residual/attention multipliers, logits scaling",
        gguf="refused: granite's scale keys",
    ),
    "smollm3": Arch("no-rope layers, tied", gguf="refused: no-rope layer keys"),
    "cohere2": Arch(
        "sliding + full layers, layer norm, tied, logit scale",
        gguf="refused: sliding-window and logit-scale keys",
    ),
    "glm4": Arch("fused gate_up, post-norms", gguf="refused: fused gate_up_proj"),
    "deepseek_v3": Arch(
        "MLA (q/kv LoRA), 4 routed + 1 shared expert, first layer dense",
        gguf="refused: stacked experts, split kv_b_proj",
    ),
}
"""config.json `model_type` -> status per backend and export."""


def nearest(model_type: str) -> str:
    """The tested architecture whose name shares the longest prefix, then is most alike
    (mistral3 -> mistral, gemma3 -> gemma3_text, qwen2_moe -> qwen2)."""

    def score(name: str) -> tuple[int, float]:
        prefix = next(
            (i for i, (a, b) in enumerate(zip(name, model_type, strict=False)) if a != b), None
        )
        prefix = min(len(name), len(model_type)) if prefix is None else prefix
        return prefix, difflib.SequenceMatcher(None, name, model_type).ratio()

    return max(ARCHITECTURES, key=score)


def notice(model_type: str, backend: str) -> str | None:
    """A warning for a model type outside the matrix (None: tested)."""
    if model_type in ARCHITECTURES:
        return None
    return (
        f"model_type {model_type!r} is not in sft's tested architecture matrix (backend "
        f"{backend}); the nearest tested one is {nearest(model_type)!r}. Training may work, but "
        "packing, LoRA fusion and exports are unverified for it: check the loss and the export "
        "(`sft models --architectures` lists what is tested)"
    )


def markdown_table() -> str:
    """The docs/models.md table, generated (the test compares it with the file)."""
    rows = [
        "| model_type | tiny test model keeps | torch | MindSpore | GGUF export |",
        "|---|---|---|---|---|",
    ]
    for name, a in ARCHITECTURES.items():
        rows.append(f"| `{name}` | {a.quirks} | {a.torch} | {a.mindspore} | {a.gguf} |")
    return "\n".join(rows) + "\n"
