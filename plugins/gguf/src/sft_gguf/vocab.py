"""Tokenizer metadata for the GGUF: tokens, token types, merges, special ids, chat template.

Mirrors llama.cpp's converter for byte-level BPE tokenizers (`_set_vocab_gpt2`): the token list
comes from the HF tokenizer (transformers, no torch), padded to `vocab_size` with `[PADn]`
UNUSED entries; added special tokens are CONTROL; merges, special ids and the chat template come
from gguf-py's `SpecialVocab`, exactly as the converter reads them.

Two choices are ours: `tokenizer.ggml.pre` (which pre-tokenizer regex llama.cpp applies) is read
from the structure of tokenizer.json instead of a hash table of known models, so a locally trained
tokenizer works; and `add_bos_token` is written explicitly from what the HF tokenizer does, so
llama.cpp tokenizes prompts the way training did.

    >>> v = load_vocab(model_dir, cfg, spec)
    >>> v.add_to(writer)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from sft.errors import SftError

from sft_gguf.arch import ArchSpec


@dataclass
class Vocab:
    model: str
    pre: str
    tokens: list[str]
    toktypes: list[int]
    special: gguf.SpecialVocab
    add_space_prefix: bool | None = None
    hf_eos_ids: list[int] = field(default_factory=list)
    """EOS ids of generation_config.json (the end-of-turn ids the hf exporter writes)."""

    def add_to(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.toktypes)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        self.special.add_to_gguf(w, quiet=True)


def load_vocab(model_dir: Path, cfg: dict[str, Any], spec: ArchSpec) -> Vocab:
    """Everything the GGUF says about the tokenizer of `model_dir`."""
    from transformers import AutoTokenizer

    if not (model_dir / "tokenizer.json").is_file():
        raise SftError(
            f"{model_dir} has no tokenizer.json; GGUF export handles byte-level BPE tokenizers "
            "(llama 3, qwen2, SmolLM2). A sentencepiece-only tokenizer (tokenizer.model) is not "
            "supported yet: convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tokens, toktypes = token_list(tok, int(cfg["vocab_size"]))
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise SftError(f"{model_dir}/tokenizer.json has no BPE merges; is it a BPE tokenizer?")
    if spec.model_type == "llama" and int(cfg["vocab_size"]) == 49152:
        # llama.cpp's converter: SmolLM / granite-small vocabularies never prepend BOS
        special.add_special_token["bos"] = False
    special.add_special_token.setdefault("bos", _hf_adds_bos(tok))
    hf_eos_ids = _generation_eos_ids(model_dir)
    if hf_eos_ids and special.special_token_ids.get("eos") not in hf_eos_ids:
        # The chat's end of turn (generation_config.json) differs from the tokenizer's EOS:
        # declare it as llama.cpp's end-of-turn token so generation stops there.
        special.special_token_ids["eot"] = hf_eos_ids[0]
    return Vocab(
        model="gpt2",
        pre=pre_tokenizer_name(model_dir),
        tokens=tokens,
        toktypes=toktypes,
        special=special,
        add_space_prefix=_add_prefix_space(model_dir) if spec.model_type == "llama" else None,
        hf_eos_ids=hf_eos_ids,
    )


def token_list(tok: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their GGUF types (NORMAL, CONTROL, USER_DEFINED, UNUSED padding)."""
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise SftError(
            f"the tokenizer has ids up to {max(vocab.values())} but config.json's vocab_size is "
            f"{vocab_size}; resize the embeddings (or fix config.json) before exporting"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = by_id[i]
        if text in added:
            if not decoder[i].normalized:
                # llama.cpp expects added tokens pre-normalized, as the converter does
                text = tok.decode(tok.encode(text, add_special_tokens=False))
            special = decoder[i].special or _looks_special(text)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    return tokens, [int(t) for t in types]


def _looks_special(text: str) -> bool:
    return text.startswith("<|") and text.endswith("|>")


def pre_tokenizer_name(model_dir: Path) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for the pre-tokenizer in tokenizer.json."""
    pre = json.loads((model_dir / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex", "")
        if r"\p{N}{1,3}" in pattern:
            return "llama-bpe"
        if r"|\p{N}|" in pattern:
            return "qwen2"
    raise SftError(
        f"the pre-tokenizer of {model_dir}/tokenizer.json ({kinds}) is not one this exporter "
        "can name for llama.cpp (gpt-2, smollm, llama-bpe, qwen2); llama.cpp would split text "
        "differently from training. Convert with llama.cpp's convert_hf_to_gguf.py instead"
    )


def _hf_adds_bos(tok: Any) -> bool:
    ids = tok("a").input_ids
    return tok.bos_token_id is not None and bool(ids) and ids[0] == tok.bos_token_id


def _add_prefix_space(model_dir: Path) -> bool | None:
    path = model_dir / "tokenizer_config.json"
    value = json.loads(path.read_text()).get("add_prefix_space") if path.is_file() else None
    return value if isinstance(value, bool) else None


def _generation_eos_ids(model_dir: Path) -> list[int]:
    path = model_dir / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
