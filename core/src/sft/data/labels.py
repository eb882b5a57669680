"""Rendered texts and their trained character spans -> token ids and labels.

One batched tokenizer call per chunk; a token is trained (label = its id) if any of its
characters lies in a trained span, else its label is -100. Spans map to tokens in one of two
ways, with the same result:

- offsets (any fast tokenizer): `labels_for` looks the span boundaries up in the encoding;
- byte lengths (byte-level BPE, `TokenBytes`): offset tracking is a sizeable part of the Rust
  tokenizer's time (`encode_batch_fast` gives the same ids without offsets; numbers in
  docs/performance.md), and such a tokenizer does not need offsets: its tokens cut the text's UTF-8 bytes into consecutive pieces
  and an id always stands for the same bytes (a vocabulary token one byte per character of its
  byte-level spelling, an added token the bytes of its content). So token boundaries are a
  cumulative sum of byte lengths and a span's tokens are found by binary search:

    "ab😀cd" -> SmolLM2 ids [369, 10813, 242, 218, 13133]    ("ab", 😀 in 3 pieces, "cd")
    bytes per token 2, 2, 1, 1, 2  ->  token boundaries 0 2 4 5 6 8
    span "😀" = characters 2..3 = bytes 2..6  ->  tokens 1, 2, 3

    labeller = Labeller(tokenizer.backend_tokenizer)
    [(ids, labels)] = labeller(["ab😀cd"], [[(2, 3)]])
    # ids [369, 10813, 242, 218, 13133], labels [-100, 10813, 242, 218, -100]
"""

from __future__ import annotations

import itertools
import json
import unicodedata
from typing import Any

import numpy as np

from sft.data.cache import IGNORE_INDEX

Spans = list[tuple[int, int]]
Encoded = tuple[np.ndarray, np.ndarray]


class Labeller:
    """(ids, labels) for texts and their trained spans, with one `tokenizers.Tokenizer`."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.token_bytes = TokenBytes.of(backend)

    def __call__(self, texts: list[str], spans: list[Spans]) -> list[Encoded]:
        """From token byte lengths where the tokenizer allows it; a text whose bytes don't add
        up, and each of the first TokenBytes.CHECKS texts, also from offsets, which decide (a
        difference switches byte lengths off for good); else from offsets."""
        tb = self.token_bytes
        if tb is None or not tb.enabled or not texts:
            return self._with_offsets(texts, spans)
        encs = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        all_ids = [np.array(enc.ids, dtype=np.int32) for enc in encs]
        fast = list(zip(all_ids, tb.labels(texts, all_ids, spans), strict=True))
        # from offsets too: texts whose bytes don't add up, and the first CHECKS texts
        checks = tb.CHECKS - tb.checked if tb.checking() else 0
        redo = [i for i, (_, labels) in enumerate(fast) if labels is None or i < checks]
        slow = self._with_offsets([texts[i] for i in redo], [spans[i] for i in redo])
        by_offsets = dict(zip(redo, slow, strict=True))
        for i, (ids, labels) in by_offsets.items():
            mine_ids, mine = fast[i]
            if mine is not None:
                tb.confirm(np.array_equal(mine_ids, ids) and np.array_equal(mine, labels))
        if not tb.enabled:  # a difference: this chunk from offsets too, and all that follow
            return self._with_offsets(texts, spans)
        return [
            by_offsets[i] if labels is None or i in by_offsets else (ids, labels)
            for i, (ids, labels) in enumerate(fast)
        ]

    def _with_offsets(self, texts: list[str], spans: list[Spans]) -> list[Encoded]:
        out: list[Encoded] = []
        if not texts:
            return out
        encs = self.backend.encode_batch(texts, add_special_tokens=False)
        for enc, text, sp in zip(encs, texts, spans, strict=True):
            ids = np.array(enc.ids, dtype=np.int32)
            out.append((ids, labels_for(enc, ids, sp, len(text))))
        return out


def labels_for(enc: Any, ids: np.ndarray, spans: Spans, n_chars: int) -> np.ndarray:
    """Labels from span boundaries looked up in the encoding (no per-token offsets list); falls
    back to offsets where a boundary character belongs to no token (trimmed offsets).

    A character split over several tokens (byte-level BPE: an emoji can be three) belongs to
    each of them and `char_to_token` names the first, so a span's last token is found by
    walking on while the next token starts inside the span."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    for a, b in spans:
        if b <= a:
            continue
        first, last = enc.char_to_token(a), enc.char_to_token(b - 1)
        if first is None or last is None:
            return labels_from_spans(ids, enc.offsets, spans, n_chars)
        while last + 1 < len(ids) and enc.token_to_chars(last + 1)[0] < b:
            last += 1
        labels[first : last + 1] = ids[first : last + 1]
    return labels


def labels_from_spans(ids: np.ndarray, offsets: Any, spans: Spans, n_chars: int) -> np.ndarray:
    """Label each token with its id if any of its characters lies in a trained span."""
    chars = np.zeros(n_chars + 1, dtype=np.int32)
    for a, b in spans:
        chars[a:b] = 1
    csum = np.concatenate([[0], np.cumsum(chars)])
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    start, end = off[:, 0], np.maximum(off[:, 1], off[:, 0] + 1)  # zero-width: its position
    hit = (csum[np.minimum(end, n_chars + 1)] - csum[start]) > 0
    return np.where(hit, ids, IGNORE_INDEX).astype(np.int32)


_SPLITTERS = {"Split", "Digits", "Punctuation"}  # pre-tokenizers that split text, never change it
_PROCESSORS = {"TemplateProcessing"}  # adds nothing with add_special_tokens=False


class TokenBytes:
    """Byte length of every token id of a byte-level BPE tokenizer.

    Only tokenizers whose pipeline cannot move bytes qualify: a ByteLevel pre-tokenizer without
    prefix space (alone or after splitting pre-tokenizers), no normalizer or NFC (then used only
    on text that is already NFC), a BPE model over byte-level spellings (no subword prefix or
    suffix, no byte fallback, no unknown token that could stand for an unknown byte), no offset
    trimming, no added token that strips whitespace. Per text, the byte lengths of its ids must
    add up to its UTF-8 length, else `labels` gives None (SmolLM2's vocabulary lacks a few
    control bytes, which the tokenizer drops)."""

    CHECKS = 32

    def __init__(self, nbytes: np.ndarray, nfc: bool) -> None:
        self.nbytes = nbytes
        self.nfc = nfc
        self.enabled = True
        self.checked = 0

    @classmethod
    def of(cls, backend: Any) -> TokenBytes | None:
        """The table for a `tokenizers.Tokenizer`, or None when its ids are not fixed bytes."""
        from tokenizers import models, pre_tokenizers

        if not hasattr(backend, "encode_batch_fast"):  # tokenizers < 0.21
            return None
        norm = _config(backend.normalizer)
        model = backend.model
        if not (
            (norm is None or norm["type"] == "NFC")
            and _byte_level_pre_tokenizer(_config(backend.pre_tokenizer))
            and _keeps_offsets(_config(backend.post_processor))
            and isinstance(model, models.BPE)
            and not (model.continuing_subword_prefix or model.end_of_word_suffix)
            and not model.byte_fallback
        ):
            return None
        vocab = backend.get_vocab(with_added_tokens=False)
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        if not set("".join(vocab)) <= alphabet:
            return None
        if model.unk_token is not None and not alphabet <= vocab.keys():
            return None  # a byte missing from the vocabulary would become <unk>
        added = backend.get_added_tokens_decoder()
        nbytes = np.zeros(max([*vocab.values(), *added]) + 1, dtype=np.int64)
        nbytes[list(vocab.values())] = list(map(len, vocab))
        for i, tok in added.items():
            n = len(tok.content.encode("utf-8"))
            if tok.lstrip or tok.rstrip or n == 0 or nbytes[i] not in (0, n):
                return None
            nbytes[i] = n
        return cls(nbytes, nfc=norm is not None)

    def labels(
        self, texts: list[str], ids: list[np.ndarray], spans: list[Spans]
    ) -> list[np.ndarray | None]:
        """For each text, every token's id where any of its bytes lies in a trained character
        span, -100 elsewhere; None where the tokens do not cover exactly the text's bytes.

        One cumulative sum and two binary searches for all texts together: a dozen numpy calls
        on small arrays per text would cost twice what offsets do."""
        if not texts:
            return []
        flat = np.concatenate(ids)
        ends = self.nbytes[flat].cumsum()  # byte position after each token, all texts in a row
        starts = list(itertools.accumulate(map(len, ids), initial=0))  # first token of each text
        base = np.concatenate([[0], ends])[starts].tolist()  # byte position where each text starts
        good, a_pos, b_pos = [], [], []
        for k, (text, sp) in enumerate(zip(texts, spans, strict=True)):
            ascii_ = text.isascii()
            size = len(text) if ascii_ else len(text.encode())
            good.append(
                base[k + 1] - base[k] == size
                and not (self.nfc and not unicodedata.is_normalized("NFC", text))
            )
            for a, b in sp if good[k] else []:
                b = min(b, len(text))
                if b > a:
                    if not ascii_:  # character -> byte positions
                        a, b = len(text[:a].encode()), len(text[:b].encode())
                    a_pos.append(base[k] + a)
                    b_pos.append(base[k] + b - 1)
        # from the token holding byte a (the first to end after it) to the one holding b - 1
        first = ends.searchsorted(a_pos, side="right").tolist()
        last = ends.searchsorted(b_pos, side="right").tolist()
        labels = np.full(len(flat), IGNORE_INDEX, dtype=np.int32)
        for i, j in zip(first, last, strict=True):
            labels[i : j + 1] = flat[i : j + 1]
        per_text = np.split(labels, starts[1:-1])
        return [lab if ok else None for lab, ok in zip(per_text, good, strict=True)]

    def checking(self) -> bool:
        return self.enabled and self.checked < self.CHECKS

    def confirm(self, same: bool) -> None:
        self.checked += 1
        self.enabled = self.enabled and same


def _config(part: Any) -> Any:
    """A pipeline component's settings, as in tokenizer.json (None stays None)."""
    return None if part is None else json.loads(part.__getstate__())


def _byte_level_pre_tokenizer(cfg: Any) -> bool:
    steps = [] if cfg is None else cfg["pretokenizers"] if cfg["type"] == "Sequence" else [cfg]
    levels = [s for s in steps if s["type"] == "ByteLevel"]
    return (
        len(levels) == 1
        and not levels[0].get("add_prefix_space")
        and all(s["type"] in _SPLITTERS for s in steps if s["type"] != "ByteLevel")
    )


def _keeps_offsets(cfg: Any) -> bool:
    """Whether the post-processor leaves offsets alone (ByteLevel's trim_offsets takes a token's
    leading space out of its offsets, so that space belongs to no token)."""
    if cfg is None:
        return True
    if cfg["type"] == "Sequence":
        return all(_keeps_offsets(c) for c in cfg["processors"])
    if cfg["type"] == "ByteLevel":
        return not cfg.get("trim_offsets")
    return cfg["type"] in _PROCESSORS
