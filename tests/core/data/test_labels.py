"""Labels from token byte lengths (byte-level BPE, `labels.TokenBytes`) equal labels from the
tokenizer's offsets, token for token, for SmolLM2's real tokenizer and the tiny ones; a character
split over several tokens (emoji, CJK) trains all of them; tokenizers that do not qualify, and
texts whose bytes do not add up, take the offsets path.

    .venvs/torch/bin/python -m pytest tests/core/data/test_labels.py -q
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sft.data.conversation import Conversation, Message
from sft.data.encoder import Encoder
from sft.data.labels import Labeller, Spans, TokenBytes, labels_for, labels_from_spans
from sft.data.templates import Renderer, resolve_template
from sft.plugins import get_plugins

from tests.core.data.conftest import load_tok
from tests.tiny import CORPUS, SPECIAL

M = -100
TOKENIZERS = ["tiny_tokenizer", "llama3_tokenizer", "smol_tokenizer"]


def by_offsets(backend: Any, text: str, spans: Spans) -> tuple[list[int], list[int], list[int]]:
    """ids, labels_for's labels and the any-character rule applied to every token's offsets."""
    enc = backend.encode(text, add_special_tokens=False)
    ids = np.array(enc.ids, dtype=np.int32)
    rule = labels_from_spans(ids, enc.offsets, spans, len(text))
    return ids.tolist(), labels_for(enc, ids, spans, len(text)).tolist(), rule.tolist()


def by_bytes(tb: TokenBytes, backend: Any, text: str, spans: Spans) -> tuple[list[int], Any]:
    (enc,) = backend.encode_batch_fast([text], add_special_tokens=False)
    ids = np.array(enc.ids, dtype=np.int32)
    (labels,) = tb.labels([text], [ids], [spans])
    return ids.tolist(), None if labels is None else labels.tolist()


def assert_same(backend: Any, text: str, spans: Spans, tb: TokenBytes | None = None) -> list[int]:
    tb = tb or TokenBytes.of(backend)
    assert tb is not None
    ids, labels = by_bytes(tb, backend, text, spans)
    want_ids, want_labels, rule = by_offsets(backend, text, spans)
    assert labels is not None, f"bytes do not add up for {text!r}"
    assert (ids, labels) == (want_ids, want_labels)
    assert labels == rule
    return labels


# -------------------------------------------------------------------- hand-written texts

SMOL_CASES = [
    # text, trained character spans, trained tokens (as byte-level token strings)
    ("ab😀cd", [(2, 3)], ["ðŁ", "ĺ", "Ģ"]),  # the emoji is 3 tokens, the span ends inside it
    ("ab😀cd", [(0, 3)], ["ab", "ðŁ", "ĺ", "Ģ"]),
    ("ab😀cd", [(3, 5)], ["cd"]),
    ("中文字符测试", [(3, 4)], ["ç¬", "¦"]),  # 符 is 2 tokens
    ("中文字符测试", [(0, 1), (4, 6)], ["ä¸Ń", "æµ", "ĭ", "è¯", "ķ"]),
    ("héllo wörld", [(1, 2)], ["Ã©"]),
    ("héllo wörld", [(5, 8)], ["Ġw", "Ã¶r"]),  # " wö": "ör" is one token, trained whole
    ("<|im_start|>😀<|im_end|>", [(12, 13)], ["ðŁ", "ĺ", "Ģ"]),
    ("<|im_start|>😀<|im_end|>", [(12, 23)], ["ðŁ", "ĺ", "Ģ", "<|im_end|>"]),
    ("x 🦜 y", [(0, 3)], ["x", "ĠðŁ", "¦", "ľ"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("text", "spans", "trained"), SMOL_CASES)
def test_smollm2_split_characters_train_every_piece(
    smol_tokenizer: Path, text: str, spans: Spans, trained: list[str]
) -> None:
    backend = _backend(smol_tokenizer)
    labels = assert_same(backend, text, spans)
    assert [backend.id_to_token(t) for t in labels if t != M] == trained


@pytest.mark.slow
def test_smollm2_literal_emoji_ids(smol_tokenizer: Path) -> None:
    backend = _backend(smol_tokenizer)
    assert assert_same(backend, "ab😀cd", [(2, 3)]) == [M, 10813, 242, 218, M]


TEXTS = [
    "ab😀cd",
    "中文字符测试 and 日本語",
    "héllo wörld, ça va? naïve café",
    "<|im_start|>user\n👩‍💻 🇫🇷<|im_end|>\n<|im_start|>assistant\n✓ ok 😀<|im_end|>\n",
    "e\u0301 vs é, ß, Ω, 𝔘𝔫𝔦",
    "",
]


@pytest.mark.parametrize("fixture", TOKENIZERS)
@pytest.mark.parametrize("text", TEXTS)
def test_every_span_of_hand_written_texts(request: Any, fixture: str, text: str) -> None:
    backend = _backend(request.getfixturevalue(fixture))
    tb = _token_bytes(request.getfixturevalue(fixture))
    for a in range(len(text) + 1):
        for b in range(a, len(text) + 1):
            assert_same(backend, text, [(a, b)], tb)
    assert_same(backend, text, [(0, len(text) // 3), (len(text) // 2, len(text))], tb)


@pytest.mark.parametrize("fixture", TOKENIZERS)
def test_completion_ending_in_an_emoji_is_trained_whole(request: Any, fixture: str) -> None:
    """A plain prompt/completion: the completion and EOS are trained, and the completion's last
    character is split over tokens. Before byte lengths, `labels_for` trained only the first of
    them. Both paths: the first CHECKS texts (offsets) and later ones (byte lengths)."""
    tok = _tok(request.getfixturevalue(fixture))
    enc = Encoder(tok, Renderer(resolve_template("chatml", tok, get_plugins()), tok))
    conv = Conversation([Message("user", "Say 🦜"), Message("assistant", "中文 🦜")], plain=True)
    for checked in (0, TokenBytes.CHECKS):
        assert enc.labeller.token_bytes is not None
        enc.labeller.token_bytes.checked = checked
        ((ids, labels),) = enc.encode([conv])
        trained = [t for t in labels.tolist() if t != M]
        assert tok.decode(trained) == "中文 🦜" + tok.eos_token
        text = enc.bos_text + "Say 🦜中文 🦜" + tok.eos_token
        assert ids.tolist() == tok(text, add_special_tokens=False).input_ids
    assert enc.labeller.token_bytes.enabled


# ------------------------------------------------------------------ property: random text

_pieces = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=6),  # any unicode, controls too
    st.sampled_from(
        [
            *SPECIAL,
            "<|eot_id|>",
            "😀",
            "🦜",
            "👩‍💻",
            "🇫🇷",
            "中文",
            "符",
            "é",
            "e\u0301",
            "ß",
            " ",
            "\n",
            "  ",
            " the",
            "Paris",
        ]
    ),
)


@st.composite
def text_and_spans(draw: st.DrawFn) -> tuple[str, Spans]:
    text = "".join(draw(st.lists(_pieces, max_size=10)))
    cuts = sorted(draw(st.lists(st.integers(0, len(text) + 2), max_size=6)))  # may overhang
    return text, list(zip(cuts[::2], cuts[1::2], strict=False))


@pytest.mark.parametrize("fixture", TOKENIZERS)
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=text_and_spans())
def test_bytes_and_offsets_agree_on_random_text(
    request: Any, fixture: str, case: tuple[str, Spans]
) -> None:
    text, spans = case
    backend = _backend(request.getfixturevalue(fixture))
    tb = _token_bytes(request.getfixturevalue(fixture))
    ids, labels = by_bytes(tb, backend, text, spans)
    want_ids, want_labels, rule = by_offsets(backend, text, spans)
    assert ids == want_ids
    assert want_labels == rule
    if labels is None:  # only where the tokenizer dropped bytes it has no token for
        assert sum(len(backend.id_to_token(i)) for i in ids) < len(text.encode())
    else:
        assert labels == want_labels


@pytest.mark.parametrize("fixture", [*TOKENIZERS, "partial_tokenizer"])
@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cases=st.lists(text_and_spans(), max_size=8))
def test_a_chunk_of_texts_is_labelled_like_each_text_alone(
    request: Any, fixture: str, cases: list[tuple[str, Spans]]
) -> None:
    """TokenBytes labels a whole chunk at once: texts whose bytes don't add up (None) must not
    shift or spill into their neighbours."""
    backend = _backend(request.getfixturevalue(fixture))
    tb = _token_bytes(request.getfixturevalue(fixture))
    texts, spans = [t for t, _ in cases], [s for _, s in cases]
    ids = [np.array(e.ids, dtype=np.int32) for e in backend.encode_batch_fast(texts)]
    for got, text, sp in zip(tb.labels(texts, ids, spans), texts, spans, strict=True):
        alone = by_bytes(tb, backend, text, sp)[1]
        assert (None if got is None else got.tolist()) == alone
        assert alone is None or alone == by_offsets(backend, text, sp)[1]


@functools.cache
def _tok(tok_dir: Path) -> Any:
    """The tokenizer in `tok_dir`, loaded once (hypothesis calls a test hundreds of times)."""
    return load_tok(tok_dir)


def _backend(tok_dir: Path) -> Any:
    return _tok(tok_dir).backend_tokenizer


@functools.cache
def _token_bytes(tok_dir: Path) -> TokenBytes:
    tb = TokenBytes.of(_backend(tok_dir))
    assert tb is not None
    return tb


@pytest.mark.parametrize("fixture", TOKENIZERS)
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    contents=st.lists(st.text(min_size=1, max_size=12).filter(str.strip), min_size=2, max_size=6)
)
def test_encoder_gives_the_same_ids_and_labels_either_way(
    request: Any, fixture: str, contents: list[str]
) -> None:
    """Random unicode conversations, past the CHECKS warm-up: the same (ids, labels) as the
    offsets path."""
    tok = _tok(request.getfixturevalue(fixture))
    enc = Encoder(tok, Renderer(resolve_template("chatml", tok, get_plugins()), tok), "all")
    msgs = [Message("user" if i % 2 == 0 else "assistant", c) for i, c in enumerate(contents)]
    msgs[-1].train = False
    convs = [Conversation(msgs[:k], f"t:{k}") for k in range(1, len(msgs) + 1)] * 40
    texts, spans = map(list, zip(*(enc.text_and_spans(c) for c in convs), strict=True))
    got = enc.labeller(texts, spans)
    want = enc.labeller._with_offsets(texts, spans)
    assert enc.labeller.token_bytes is not None and enc.labeller.token_bytes.enabled
    assert [(i.tolist(), x.tolist()) for i, x in got] == [(i.tolist(), x.tolist()) for i, x in want]


# -------------------------------------------------------------- which path runs, fallbacks


class Spy:
    """A backend that records how many texts each encode call got."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.calls = backend, []

    def encode_batch(self, texts: list[str], **kw: Any) -> Any:
        self.calls.append(("offsets", len(texts)))
        return self.backend.encode_batch(texts, **kw)

    def encode_batch_fast(self, texts: list[str], **kw: Any) -> Any:
        self.calls.append(("fast", len(texts)))
        return self.backend.encode_batch_fast(texts, **kw)


def test_offsets_only_for_the_first_checks(tiny_tokenizer: Path) -> None:
    lab = Labeller(load_tok(tiny_tokenizer).backend_tokenizer)
    lab.backend = spy = Spy(lab.backend)
    texts = [f"text {i} 😀 more" for i in range(40)]
    lab(texts, [[(0, 6)]] * 40)
    lab(texts[:10], [[(2, 8)]] * 10)
    assert spy.calls == [("fast", 40), ("offsets", TokenBytes.CHECKS), ("fast", 10)]
    assert lab.token_bytes is not None and lab.token_bytes.enabled


def test_a_difference_in_the_checks_switches_byte_lengths_off(tiny_tokenizer: Path) -> None:
    lab = Labeller(load_tok(tiny_tokenizer).backend_tokenizer)
    assert lab.token_bytes is not None
    lab.token_bytes.labels = lambda texts, ids, spans: [x.copy() for x in ids]  # type: ignore[method-assign]
    lab.backend = spy = Spy(lab.backend)
    texts, spans = [f"hello {i}" for i in range(40)], [[(0, 5)]] * 40
    got = lab(texts, spans)
    want = lab._with_offsets(texts, spans)
    assert [x.tolist() for _, x in got] == [x.tolist() for _, x in want]
    assert not lab.token_bytes.enabled
    spy.calls.clear()
    lab(texts, spans)
    assert spy.calls == [("offsets", 40)]


def _rebuilt(tok_dir: Path, edit: Any) -> Any:
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str((tok_dir / "tokenizer.json").read_text())
    edit(backend)
    return backend


def _set(name: str, value: Any) -> Any:
    return lambda backend: setattr(backend, name, value)


def _edits() -> dict[str, tuple[Any, bool]]:
    from tokenizers import AddedToken, normalizers, pre_tokenizers, processors

    return {
        "as saved": (lambda b: None, True),
        "NFC normalizer": (_set("normalizer", normalizers.NFC()), True),
        "split before ByteLevel": (
            _set(
                "pre_tokenizer",
                pre_tokenizers.Sequence(
                    [pre_tokenizers.Digits(), pre_tokenizers.ByteLevel(add_prefix_space=False)]
                ),
            ),
            True,
        ),
        "ByteLevel post-processor without trimming": (
            _set("post_processor", processors.ByteLevel(trim_offsets=False)),
            True,
        ),
        "lowercase normalizer": (_set("normalizer", normalizers.Lowercase()), False),
        "prefix space": (
            _set("pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)),
            False,
        ),
        "Metaspace": (_set("pre_tokenizer", pre_tokenizers.Metaspace()), False),
        "no pre-tokenizer": (_set("pre_tokenizer", None), False),
        "trimmed offsets": (_set("post_processor", processors.ByteLevel(trim_offsets=True)), False),
        "lstrip added token": (
            lambda b: b.add_special_tokens([AddedToken("<mask>", lstrip=True)]),
            False,
        ),
    }


@pytest.mark.parametrize("name", list(_edits()))
def test_which_tokenizers_qualify(tiny_tokenizer: Path, name: str) -> None:
    edit, qualifies = _edits()[name]
    assert (TokenBytes.of(_rebuilt(tiny_tokenizer, edit)) is not None) is qualifies


def test_trimmed_offsets_would_disagree(tiny_tokenizer: Path) -> None:
    """Why trimming disqualifies: the offsets path leaves out a token whose only trained
    character is its leading space."""
    from tokenizers import processors

    plain = _rebuilt(tiny_tokenizer, lambda b: None)
    trimmed = _rebuilt(tiny_tokenizer, _set("post_processor", processors.ByteLevel()))
    tb = TokenBytes.of(plain)
    assert tb is not None
    text, spans = "The quick fox", [(3, 4)]  # the space before "quick"
    _, by_bytes_labels = by_bytes(tb, plain, text, spans)
    assert by_bytes_labels == by_offsets(plain, text, spans)[1]
    assert by_bytes_labels != by_offsets(trimmed, text, spans)[1]


def test_nfc_tokenizer_uses_offsets_for_text_that_is_not_nfc(tiny_tokenizer: Path) -> None:
    from tokenizers import normalizers

    backend = _rebuilt(tiny_tokenizer, _set("normalizer", normalizers.NFC()))
    tb = TokenBytes.of(backend)
    assert tb is not None
    assert by_bytes(tb, backend, "cafe\u0301", [(0, 4)])[1] is None  # decomposed é
    # NFC reorders these combining marks: the same bytes in another order, so only the NFC test
    # (not the byte count) sees that the tokens do not follow the text
    assert by_bytes(tb, backend, "x\u0301\u0316 y", [(0, 2)])[1] is None
    assert by_bytes(tb, backend, "café", [(0, 4)])[1] == by_offsets(backend, "café", [(0, 4)])[1]


def _save(backend: Any, path: Path, **special: str) -> Path:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(str(path))
    return path


def test_wordpiece_and_metaspace_tokenizers_use_offsets(tmp_path: Path) -> None:
    """Tokenizers built here, nothing downloaded: no byte lengths, and still the labels of the
    any-character rule."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(
        CORPUS,
        trainers.WordPieceTrainer(
            vocab_size=200, special_tokens=["[UNK]", "[SEP]"], show_progress=False
        ),
    )
    sp = Tokenizer(models.BPE(byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    sp.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False)
    )
    for name, backend, eos in (("wordpiece", wp, "[SEP]"), ("metaspace", sp, "</s>")):
        tok = load_tok(_save(backend, tmp_path / name, eos_token=eos))
        lab = Labeller(tok.backend_tokenizer)
        assert lab.token_bytes is None
        lab.backend = spy = Spy(lab.backend)
        text = "Hello cats, the quick fox"
        ((ids, labels),) = lab([text], [[(6, 10)]])
        assert spy.calls == [("offsets", 1)]
        enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
        want = labels_from_spans(ids, enc.offsets, [(6, 10)], len(text))
        assert labels.tolist() == want.tolist() and (labels != M).any()


@pytest.fixture(scope="session")
def partial_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE trained without the full byte alphabet (as SmolLM2's lacks a few control
    bytes): it drops the bytes it has no token for."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    return _save(bpe, tmp_path_factory.mktemp("partial-tok"))


def test_bytes_the_vocabulary_lacks_fall_back_to_offsets(partial_tokenizer: Path) -> None:
    """Texts with bytes the tokenizer drops take the offsets path."""
    backend = load_tok(partial_tokenizer).backend_tokenizer
    tb = TokenBytes.of(backend)
    assert tb is not None
    texts = ["The fox", "The @fox ~ 😀", "Paris"]  # "@", "~" and the emoji are not in CORPUS
    spans = [[(0, 3)], [(4, 8)], [(0, 5)]]
    assert [by_bytes(tb, backend, t, s)[1] is None for t, s in zip(texts, spans, strict=True)] == [
        False,
        True,
        False,
    ]
    lab = Labeller(backend)
    assert lab.token_bytes is not None
    lab.token_bytes.checked = TokenBytes.CHECKS  # past the warm-up checks
    lab.backend = spy = Spy(lab.backend)
    got = lab(texts, spans)
    assert spy.calls == [("fast", 3), ("offsets", 1)]
    want = lab._with_offsets(texts, spans)
    assert [(i.tolist(), x.tolist()) for i, x in got] == [(i.tolist(), x.tolist()) for i, x in want]
    assert json.loads(backend.to_str())["model"]["unk_token"] is None
