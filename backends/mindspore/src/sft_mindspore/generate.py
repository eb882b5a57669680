"""Try a model without torch: a finished run (either backend) or an HF directory, answered by
MindFormers' legacy llama with the run's own chat template and end-of-turn ids.

    $ sft generate runs/qwen2-tiny-lora --prompt "Who are you?"     # MindSpore environment
    $ sft chat runs/qwen2-tiny-lora                                  # /reset, /exit

What is loaded (`sft_mindspore.export.locate_weights`): a run's final/model (merged HF), or a
LoRA run's PEFT adapter merged into its base with numpy, or an HF directory / converted built-in
name; the tokenizer and generation_config.json (eos ids that end an assistant turn) from the
run's final/ directory. Decoding is MindFormers' `generate` (greedy, or top-p sampling), in
float32, without a KV cache (MindFormers' cache is paged attention, an Ascend kernel), so every
new token recomputes the sequence: fine for trying a model, slow for long answers on a CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft.errors import SftError
from sft.inference import Sampling, cut_at_eos, decode_answer, render_prompt, saved_eos_ids
from sft.inference import chat_loop as core_chat_loop


@dataclass
class Loaded:
    """Weights, tokenizer and end-of-turn ids ready for inference; networks are built per
    sequence length (MindFormers compiles static shapes) and share the weights."""

    hf_config: dict[str, Any]
    params: dict[str, Any]
    """MindFormers-named mindspore Parameters."""
    tokenizer: Any
    eos_ids: list[int]
    source: str
    networks: dict[int, Any] = field(default_factory=dict)

    def network(self, length: int) -> Any:
        """A network whose static sequence length holds `length` tokens (a multiple of 64)."""
        seq = max(64, -(-length // 64) * 64)
        if seq not in self.networks:
            self.networks = {seq: build_network(self.hf_config, seq, self.params)}
        return self.networks[seq]


def device() -> str:
    """Ascend when CANN's environment is set, else CPU (`mindspore.device_target: auto`)."""
    from sft_mindspore.options import MindSporeOptions
    from sft_mindspore.runtime import resolve_device

    return resolve_device(MindSporeOptions())


def _context() -> None:
    from sft.paths import cache_root

    # MindFormers' logs go to $LOCAL_DEFAULT_PATH, by default ./output in the user's directory
    os.environ.setdefault("LOCAL_DEFAULT_PATH", str(cache_root() / "mindformers-logs"))
    import mindspore as ms

    from sft_mindspore.cpu_compat import apply_runtime_patches

    target = device()
    ms.set_context(mode=0, device_target=target)  # graph mode: compiled once per length
    apply_runtime_patches(target)


def build_network(hf: dict[str, Any], seq_length: int, params: dict[str, Any]) -> Any:
    """MindFormers' legacy LlamaForCausalLM for inference (batch 1, float32, no KV cache)."""
    import mindspore as ms
    import numpy as np
    from mindformers import LlamaConfig, LlamaForCausalLM

    from sft_mindspore.mfconfig import model_config

    mc = model_config(hf, seq_length, device(), 1)
    mc.pop("type")
    mc.update(compute_dtype="float32", use_past=False, use_flash_attention=False)
    mc["max_position_embedding"] = max(mc["max_position_embedding"], seq_length)
    net = LlamaForCausalLM(LlamaConfig(**mc))
    missing, _ = ms.load_param_into_net(net, params, strict_load=True)
    if missing:
        raise SftError(f"the weights lack parameters of the network: {missing[:5]}")
    net.set_train(False)
    # greedy search uses mint.argmax (ArgMaxExt), which has no CPU kernel; numpy's argmax
    # picks the first of equal maxima, as torch's does
    net.argmax = lambda x, axis=-1: ms.Tensor(np.argmax(x.asnumpy(), axis), ms.int32)
    return net


def load_for_inference(target: str | Path) -> Loaded:
    """A run directory (final/model, or final/adapter on its base), an HF directory or a
    built-in name already converted (`sft models prepare` in the torch environment)."""
    import mindspore as ms
    from sft.data.tokenizer import load_tokenizer
    from sft.models import resolve_model
    from sft.safetensors_io import read_dir

    from sft_mindspore.export import locate_weights, merge_peft
    from sft_mindspore.weights import check_model_type, hf_to_ms_name, to_ms_tensor

    _context()
    path = Path(target).expanduser()
    if path.is_dir():
        model_dir, adapter = locate_weights(path)
    else:
        model_dir, adapter = resolve_model(str(target)).path, None
    hf = check_model_type(model_dir)
    weights = read_dir(model_dir)
    if adapter is not None:
        weights = merge_peft(weights, adapter)
    if hf.get("tie_word_embeddings") and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    params = {
        hf_to_ms_name(k): ms.Parameter(to_ms_tensor(v), name=hf_to_ms_name(k))
        for k, v in weights.items()
    }
    meta = _meta_dir(path, adapter, model_dir)
    tok = load_tokenizer(meta)
    source = f"adapter {adapter} on base {model_dir}" if adapter else f"model {model_dir}"
    return Loaded(hf, params, tok, eos_ids_of(Path(meta), tok), source)


def _meta_dir(path: Path, adapter: Path | None, model_dir: Path) -> Path:
    """Where the tokenizer (with the chat template used in training) and
    generation_config.json are: a run's final/, else beside the weights."""
    for d in (path / "final", path, adapter, model_dir) if path.is_dir() else (model_dir,):
        if d is not None and (Path(d) / "tokenizer_config.json").is_file():
            return Path(d)
    raise SftError(f"no tokenizer (tokenizer_config.json) in {path} or beside its weights")


def eos_ids_of(directory: Path, tok: Any) -> list[int]:
    """eos ids from generation_config.json in `directory`, else the template's end of turn."""
    from sft.data.templates import Renderer, Template
    from sft.data.tokenizer import end_of_turn_ids

    saved = saved_eos_ids(directory)
    if saved is not None:
        return saved
    if not getattr(tok, "chat_template", None):
        return [int(tok.eos_token_id)] if tok.eos_token_id is not None else []
    template = Template("auto (tokenizer)", tok.chat_template)
    return end_of_turn_ids(tok, Renderer(template, tok), template)


def generate_ids(loaded: Loaded, prompt: list[int], sampling: Sampling) -> list[int]:
    """New token ids for one prompt, cut at the first end-of-turn id."""
    net = loaded.network(len(prompt) + sampling.max_new_tokens)
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else loaded.eos_ids[0]
    kwargs: dict[str, Any] = {"do_sample": sampling.temperature > 0}
    if sampling.temperature > 0:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    out = net.generate(
        [prompt],
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=loaded.eos_ids,
        pad_token_id=pad,
        seed=sampling.seed,
        **kwargs,
    )
    row = [int(t) for t in out[0]]
    return cut_at_eos(row[len(prompt) :], loaded.eos_ids)


def reply(loaded: Loaded, messages: list[dict[str, str]], sampling: Sampling) -> str:
    """The assistant's next message for a conversation."""
    new = generate_ids(loaded, render_prompt(loaded.tokenizer, messages), sampling)
    return decode_answer(loaded.tokenizer, new)


def chat_loop(loaded: Loaded, sampling: Sampling, system: str | None = None) -> None:
    """Core's chat loop (`sft.inference.chat_loop`) answered by this model."""
    core_chat_loop(loaded.source, lambda history: reply(loaded, history, sampling), system)
