"""The tokenizer side of data preparation: loading, saving with the template actually used,
padding id and end-of-turn ids.

    tok = load_tokenizer(model_dir)
    save_tokenizer(tok, template, cache_dir / "tokenizer")   # what backends save beside weights
    end_of_turn_ids(tok, renderer, template)                 # e.g. [2] for <|im_end|>
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sft.data.templates import Renderer, Template
from sft.errors import SftError


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    """AutoTokenizer from a local model directory (never downloads)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise SftError(f"cannot load the tokenizer from {path}: {exc}") from exc


def save_tokenizer(tok: Any, template: Template, out: Path) -> None:
    """Save with the chat template used for training, loadable by transformers 4.57 and 5.x."""
    tok.chat_template = template.source
    tok.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # transformers 5 writes a class name 4.57 does not know; the generic fast class loads in both.
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def pad_id(tok: Any) -> int:
    """Padding id: the tokenizer's pad token, else its EOS (padding is never trained)."""
    for tid in (tok.pad_token_id, tok.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def special_ids(tok: Any) -> set[int]:
    ids = set(tok.all_special_ids)
    ids |= {int(i) for i, t in getattr(tok, "added_tokens_decoder", {}).items() if t.special}
    return ids


def end_of_turn_ids(tok: Any, renderer: Renderer, template: Template) -> list[int]:
    """Token ids that end an assistant turn in this template, plus the tokenizer's EOS.
    Built-ins name their stop text; for other templates it is read off a rendering."""
    stop = template.stop or _rendered_stop(renderer)
    ids = tok(stop, add_special_tokens=False).input_ids if stop else []
    special = special_ids(tok)
    out = [i for i in ids if i in special] or (ids if len(ids) == 1 else [])
    if tok.eos_token_id is not None:
        out.append(int(tok.eos_token_id))
    return sorted(set(out), key=out.index)


def _rendered_stop(renderer: Renderer, probe: str = "Sure, here it is.") -> str:
    # The text between the assistant's content and the next turn, e.g. "<|im_end|>".
    msgs = [{"role": "user", "content": "Hello"}]
    try:
        head = renderer(msgs, add_generation_prompt=True)
        full = renderer([*msgs, {"role": "assistant", "content": probe}])
    except Exception:
        return ""
    at = full.find(probe, len(head) if full.startswith(head) else 0)
    return full[at + len(probe) :].strip() if at >= 0 else ""
