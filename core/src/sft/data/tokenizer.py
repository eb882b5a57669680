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
    """AutoTokenizer from a local model directory (never downloads).

    A tokenizer whose `tokenizer_class` the installed transformers does not know (transformers
    5 writes `TokenizersBackend`, which 4.57 lacks) is loaded from its `tokenizer.json` as a
    `PreTrainedTokenizerFast` with the special tokens and chat template of its config: the
    same ids and the same chat rendering in every environment."""
    from transformers import AutoTokenizer

    try:
        if _unknown_class(Path(path)):
            return _fast_from_tokenizer_json(Path(path))
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise SftError(f"cannot load the tokenizer from {path}: {exc}") from exc


_SPECIAL_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)
_PLAIN_KEYS = (
    "model_max_length",
    "padding_side",
    "truncation_side",
    "model_input_names",
    "clean_up_tokenization_spaces",
)


def _tokenizer_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "tokenizer_config.json"
    return json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}


def _unknown_class(path: Path) -> bool:
    """The config names a tokenizer class this transformers lacks, and tokenizer.json exists
    (a class shipped as remote code, `auto_map`, is left to AutoTokenizer)."""
    import transformers

    cfg = _tokenizer_config(path)
    name = cfg.get("tokenizer_class")
    if not isinstance(name, str) or "auto_map" in cfg or not (path / "tokenizer.json").is_file():
        return False
    return not any(hasattr(transformers, n) for n in (name, name + "Fast"))


def _token_text(value: Any) -> Any:
    # special tokens are strings or serialized AddedTokens ({"content": ..., ...})
    return value.get("content") if isinstance(value, dict) else value


def _fast_from_tokenizer_json(path: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    cfg = _tokenizer_config(path)
    kwargs: dict[str, Any] = {k: cfg[k] for k in _PLAIN_KEYS if k in cfg}
    for key in _SPECIAL_KEYS:
        if cfg.get(key) is not None:
            kwargs[key] = _token_text(cfg[key])
    extra = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens")
    if isinstance(extra, list) and extra:
        kwargs["additional_special_tokens"] = [_token_text(t) for t in extra]
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **kwargs)
    template = cfg.get("chat_template")
    jinja = path / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t["name"]: t["template"] for t in template}
    if template is not None:
        tok.chat_template = template
    tok.name_or_path = str(path)
    return tok


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
