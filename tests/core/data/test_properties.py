"""Property tests (hypothesis): for random conversations the trained tokens decode to exactly the
assistant contents plus their end-of-turn markers; packing keeps every token, never exceeds
max_seq_len, and position ids restart at each sample.

    .venvs/torch/bin/python -m pytest tests/core/data/test_properties.py -q
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sft.data.batching import collate, pack_rows
from sft.data.cache import IGNORE_INDEX, TokenizedSplit
from sft.data.conversation import Conversation, Message
from sft.data.encoder import Encoder
from sft.data.templates import Renderer, resolve_template
from sft.plugins import get_plugins

from tests.core.data.conftest import load_tok

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Contents start and end with a visible character: a token straddling the header/content
# boundary (e.g. "\n" + "\nHi") is trained whole, which would add header text to the decoding.
_inner = st.text(
    st.sampled_from(list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,!?'é中\n")), max_size=30
)
content = st.builds(
    lambda a, mid, b: a + mid + b,
    st.sampled_from(list("abcxyzHIQ0129?!é中")),
    _inner,
    st.sampled_from(list("abcxyz.!?9中")),
)


@st.composite
def conversations(draw: st.DrawFn) -> tuple[list[Message], str | None]:
    system = draw(st.one_of(st.none(), content))
    turns = draw(st.integers(1, 3))
    msgs = [Message("system", system)] if system else []
    for _ in range(turns):
        msgs += [Message("user", draw(content)), Message("assistant", draw(content))]
    return msgs, system


@functools.lru_cache(maxsize=8)
def _encoder(tok_dir: Path, template: str, mask: str) -> tuple[Any, Encoder]:
    tok = load_tok(tok_dir)
    return tok, Encoder(tok, Renderer(resolve_template(template, tok, get_plugins()), tok), mask)


def _trained_text(
    tok_dir: Path, template: str, msgs: list[Message], mask: str = "assistant"
) -> str:
    tok, enc = _encoder(tok_dir, template, mask)
    ((ids, labels),) = enc.encode([Conversation(msgs, "prop:1")])
    assert ids.tolist() == tok(tok.decode(ids.tolist()), add_special_tokens=False).input_ids
    return tok.decode([t for t in labels.tolist() if t != IGNORE_INDEX])


@SETTINGS
@given(conversations())
def test_chatml_trained_tokens_are_assistant_contents(tiny_tokenizer: Path, conv: tuple) -> None:
    msgs, _ = conv
    want = "".join(m.content + "<|im_end|>" for m in msgs if m.role == "assistant")
    assert _trained_text(tiny_tokenizer, "auto", msgs) == want


@SETTINGS
@given(conversations())
def test_llama3_trained_tokens_are_assistant_contents(llama3_tokenizer: Path, conv: tuple) -> None:
    msgs, _ = conv
    want = "".join(m.content.strip() + "<|eot_id|>" for m in msgs if m.role == "assistant")
    assert _trained_text(llama3_tokenizer, "auto", msgs) == want


@SETTINGS
@given(conversations())
def test_last_policy_trains_only_the_last_turn(tiny_tokenizer: Path, conv: tuple) -> None:
    msgs, _ = conv
    assert _trained_text(tiny_tokenizer, "chatml", msgs, "last") == msgs[-1].content + "<|im_end|>"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=60), st.integers(64, 160))
def test_packing_keeps_every_token_within_max_len(lengths: list[int], max_len: int) -> None:
    rows = pack_rows(lengths, max_len)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= max_len for r in rows)
    rng = np.random.default_rng(len(lengths))
    samples = []
    for n in lengths:
        ids = rng.integers(3, 300, n).tolist()
        samples.append((ids, [IGNORE_INDEX, *ids[1:]]))
    split = TokenizedSplit.from_samples(samples)
    batch = collate(split, rows, pad_id=0)
    for b, row in enumerate(rows):
        t = 0
        for i in row:
            n = lengths[i]
            assert batch["input_ids"][b, t : t + n].tolist() == samples[i][0]  # every token kept
            assert batch["position_ids"][b, t : t + n].tolist() == list(range(n))  # restart
            assert batch["labels"][b, t] == IGNORE_INDEX  # never predicted across samples
            t += n
        assert batch["attention_mask"][b].sum() == t
        assert batch["seq_lens"][b] == [lengths[i] for i in row]


# Contents with surrounding whitespace make trimming templates (llama3) take the real-render path.
loose = st.builds(
    lambda a, c, b: a + c + b, st.sampled_from(["", " ", "\n"]), content, st.sampled_from(["", " "])
)


@SETTINGS
@given(
    st.lists(loose, min_size=2, max_size=6),
    st.sampled_from(["chatml", "llama3", "vicuna_v1.1", "alpaca", "llama2"]),
    st.sampled_from(["assistant", "last", "all"]),
)
def test_substituted_prefixes_equal_real_renderings(
    tiny_tokenizer: Path, contents: list[str], template: str, mask: str
) -> None:
    from sft.data.encoder import _chat_spans, _real_prefixes

    msgs = [Message("user" if i % 2 == 0 else "assistant", c) for i, c in enumerate(contents)]
    _, enc = _encoder(tiny_tokenizer, template, mask)
    enc.shapes.checked = enc.shapes.CHECKS  # no warm-up comparisons: use the shortcut
    got = enc.text_and_spans(Conversation(msgs, "prop:1"))
    want = _chat_spans(enc.render, _real_prefixes(enc.render, msgs), msgs, enc._trained(msgs), mask)
    assert got == want and enc.shapes.enabled
