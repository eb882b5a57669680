"""Exact token ids and labels for hand-written conversations: chatml (tiny tokenizer), Llama 3
(tiny tokenizer with Llama 3's special tokens and real template) and SmolLM2-135M-Instruct's own
tokenizer and template. Expected values are written as the pieces a reader can check: each
piece's text, whether it is trained, and (for chatml) the literal ids.

    .venvs/torch/bin/python -m pytest tests/core/data/test_encoder.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sft.data.conversation import Conversation, Message
from sft.data.encoder import Encoder
from sft.data.templates import Renderer, resolve_template
from sft.errors import SftError
from sft.plugins import get_plugins

from tests.core.data.conftest import load_tok

M = -100


def encode(
    tok_dir: Path,
    messages: list[Message],
    template: str = "auto",
    mask: str = "assistant",
    system_prompt: str | None = None,
    plain: bool = False,
) -> tuple[list[int], list[int]]:
    tok = load_tok(tok_dir)
    enc = Encoder(
        tok, Renderer(resolve_template(template, tok, get_plugins()), tok), mask, system_prompt
    )
    ((ids, labels),) = enc.encode([Conversation(messages, "test:1", plain=plain)])
    return ids.tolist(), labels.tolist()


def expected(tok_dir: Path, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids of each piece tokenized alone, labelled with the id when the piece is trained."""
    tok = load_tok(tok_dir)
    ids, labels = [], []
    for text, trained in pieces:
        piece = tok(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if trained else [M] * len(piece)
    return ids, labels


def full_ids(tok_dir: Path, messages: list[Message]) -> list[int]:
    """What transformers itself gives for the whole conversation."""
    tok = load_tok(tok_dir)
    text = tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages], tokenize=False
    )
    return tok(text, add_special_tokens=False).input_ids


U, A, S = "user", "assistant", "system"


def test_chatml_single_turn_literal_ids(tiny_tokenizer: Path) -> None:
    ids, labels = encode(tiny_tokenizer, [Message(U, "Hi"), Message(A, "Hello")])
    # <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n | Hello<|im_end|> | \n
    prompt = [1, 87, 306, 201, 42, 75, 2, 201, 1, 67, 305, 268, 307, 86, 201]
    answer = [42, 283, 78, 81, 2]
    assert ids == prompt + answer + [201]
    assert labels == [M] * len(prompt) + answer + [M]


def test_chatml_multi_turn_with_system(tiny_tokenizer: Path) -> None:
    msgs = [
        Message(S, "You are a helpful assistant."),
        Message(U, "What is the capital of France?"),
        Message(A, "Paris."),
        Message(U, "Tell me a joke about cats."),
        Message(A, "No."),
    ]
    ids, labels = encode(tiny_tokenizer, msgs)
    want = expected(
        tiny_tokenizer,
        [
            ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", False),
            (
                "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
                False,
            ),
            ("Paris.<|im_end|>", True),
            (
                "\n<|im_start|>user\nTell me a joke about cats.<|im_end|>\n<|im_start|>assistant\n",
                False,
            ),
            ("No.<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert (ids, labels) == want
    assert ids == full_ids(tiny_tokenizer, msgs)


@pytest.mark.parametrize(
    ("mask", "overrides", "trained_pieces"),
    [
        ("assistant", (None, None, None, None), ["Paris.<|im_end|>", "No.<|im_end|>"]),
        ("last", (None, None, None, None), ["No.<|im_end|>"]),
        ("assistant", (None, False, None, None), ["No.<|im_end|>"]),  # per-message train: false
        ("last", (None, True, None, None), ["Paris.<|im_end|>", "No.<|im_end|>"]),
        (
            "assistant",
            (True, None, None, None),  # a user turn switched on: the whole turn
            ["<|im_start|>user\nHi<|im_end|>\n", "Paris.<|im_end|>", "No.<|im_end|>"],
        ),
    ],
)
def test_policies_and_overrides(
    tiny_tokenizer: Path, mask: str, overrides: tuple, trained_pieces: list[str]
) -> None:
    contents = [(U, "Hi"), (A, "Paris."), (U, "Why?"), (A, "No.")]
    msgs = [Message(r, c, t) for (r, c), t in zip(contents, overrides)]
    ids, labels = encode(tiny_tokenizer, msgs, mask=mask)
    tok = load_tok(tiny_tokenizer)
    want = [t for piece in trained_pieces for t in tok(piece, add_special_tokens=False).input_ids]
    assert [lab for lab in labels if lab != M] == want
    assert ids == full_ids(tiny_tokenizer, msgs)


def test_mask_all_trains_everything_but_switched_off_turns(tiny_tokenizer: Path) -> None:
    msgs = [Message(U, "Hi"), Message(A, "Hello")]
    ids, labels = encode(tiny_tokenizer, msgs, mask="all")
    assert labels == ids
    ids, labels = encode(tiny_tokenizer, [Message(U, "Hi", False), Message(A, "Hello")], mask="all")
    assert (ids, labels) == expected(
        tiny_tokenizer,
        [
            ("<|im_start|>user\nHi<|im_end|>\n", False),
            ("<|im_start|>assistant\nHello<|im_end|>\n", True),
        ],
    )


def test_mask_all_trains_from_the_first_character(tiny_tokenizer: Path, tmp_path: Path) -> None:
    # A template whose rendering starts with a one-character token ("Q"), and a switched-off
    # turn after it: everything but that turn is trained, the first token included.
    tpl = tmp_path / "contents.jinja"
    tpl.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    msgs = [Message(U, "Q: Hi?"), Message(A, "Hello", False), Message(U, "Bye?"), Message(A, "Ok")]
    ids, labels = encode(tiny_tokenizer, msgs, template=str(tpl), mask="all")
    assert load_tok(tiny_tokenizer).convert_ids_to_tokens(ids[:1]) == ["Q"]
    assert (ids, labels) == expected(
        tiny_tokenizer, [("Q: Hi?\n", True), ("Hello\n", False), ("Bye?\nOk\n", True)]
    )


def test_plain_records_train_the_text_and_the_eos(tiny_tokenizer: Path) -> None:
    # Format `text`: one plain message, no template; all of it and the EOS are trained.
    ids, labels = encode(tiny_tokenizer, [Message(A, "Hello world.")], plain=True)
    assert (ids, labels) == expected(tiny_tokenizer, [("Hello world.<|im_end|>", True)])
    # String prompt_completion: the prompt is context only, the completion and EOS are trained.
    ids, labels = encode(tiny_tokenizer, [Message(U, "Hi.\n"), Message(A, "Hello")], plain=True)
    assert (ids, labels) == expected(tiny_tokenizer, [("Hi.\n", False), ("Hello<|im_end|>", True)])
    # mask all: every token, down to the first one-character token ("Q"), is trained
    msgs = [Message(U, "Q: Hi?\n"), Message(A, "Hello")]
    ids, labels = encode(tiny_tokenizer, msgs, mask="all", plain=True)
    assert load_tok(tiny_tokenizer).convert_ids_to_tokens(ids[:1]) == ["Q"]
    assert labels == ids


def test_system_prompt_is_added_and_masked(tiny_tokenizer: Path) -> None:
    ids, labels = encode(
        tiny_tokenizer, [Message(U, "Hi"), Message(A, "Hello")], system_prompt="Be brief."
    )
    assert (ids, labels) == expected(
        tiny_tokenizer,
        [
            ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n", False),
            ("<|im_start|>assistant\n", False),
            ("Hello<|im_end|>", True),
            ("\n", False),
        ],
    )


def test_llama3_template_multi_turn(llama3_tokenizer: Path) -> None:
    msgs = [
        Message(S, "You are a helpful assistant."),
        Message(U, "Hello!"),
        Message(A, " The capital of France is Paris. "),
        Message(U, "Translate to German: good morning."),
        Message(A, "Guten Morgen."),
    ]
    ids, labels = encode(llama3_tokenizer, msgs)
    H = "<|start_header_id|>{}<|end_header_id|>\n\n"
    want = expected(
        llama3_tokenizer,
        [
            (
                "<|begin_of_text|>" + H.format("system") + "You are a helpful assistant.<|eot_id|>",
                False,
            ),
            (H.format("user") + "Hello!<|eot_id|>" + H.format("assistant"), False),
            ("The capital of France is Paris.<|eot_id|>", True),  # the template trims content
            (
                H.format("user")
                + "Translate to German: good morning.<|eot_id|>"
                + H.format("assistant"),
                False,
            ),
            ("Guten Morgen.<|eot_id|>", True),
        ],
    )
    assert (ids, labels) == want
    # <|begin_of_text|> = 0 starts the rendering; <|eot_id|> = 4 ends (and is trained in) each turn
    assert ids[0] == 0 and labels.count(4) == 2
    assert ids == full_ids(llama3_tokenizer, msgs)
    # The built-in llama3 template renders exactly like Meta's.
    assert encode(llama3_tokenizer, msgs, template="llama3") == (ids, labels)


@pytest.mark.slow
def test_smollm2_own_template(smol_tokenizer: Path) -> None:
    # SmolLM2's template inserts its own system prompt when there is none: context, never trained.
    msgs = [
        Message(U, "What is 2+2?"),
        Message(A, "2+2 is 4."),
        Message(U, "And 3+3?"),
        Message(A, "It is 6.", train=False),
        Message(U, "Thanks"),
        Message(A, "You're welcome!"),
    ]
    ids, labels = encode(smol_tokenizer, msgs)
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    want = expected(
        smol_tokenizer,
        [
            (f"<|im_start|>system\n{default_system}<|im_end|>\n", False),
            ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", False),
            ("2+2 is 4.<|im_end|>", True),
            (
                "\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\nIt is 6.<|im_end|>\n",
                False,
            ),
            ("<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n", False),
            ("You're welcome!<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert (ids, labels) == want
    assert ids == full_ids(smol_tokenizer, msgs)
    assert labels.count(2) == 2  # <|im_end|> (id 2, SmolLM2's eos) ends each trained turn


@pytest.mark.slow
def test_smollm2_with_system_prompt(smol_tokenizer: Path) -> None:
    msgs = [Message(S, "Answer in French."), Message(U, "Hello"), Message(A, "Bonjour")]
    ids, labels = encode(smol_tokenizer, msgs)
    tok = load_tok(smol_tokenizer)
    assert tok.decode([t for t in labels if t != M]) == "Bonjour<|im_end|>"
    assert ids == full_ids(smol_tokenizer, msgs)


def test_template_auto_without_chat_template_names_builtins(tmp_path: Path) -> None:
    from tests.tiny import make_tokenizer

    tok_dir = make_tokenizer(tmp_path / "tok", template="")
    tok = load_tok(tok_dir)
    tok.chat_template = None
    with pytest.raises(SftError, match=r"no chat template.*chatml.*llama3"):
        resolve_template("auto", tok, get_plugins())


def test_non_incremental_template_is_a_clear_error(tiny_tokenizer: Path, tmp_path: Path) -> None:
    # Renders the turn count first: prefixes of the rendering are not renderings of prefixes.
    bad = tmp_path / "count.jinja"
    bad.write_text("{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(
        SftError, match=r"count\.jinja.*does not render conversations incrementally"
    ) as err:
        encode(tiny_tokenizer, [Message(U, "Hi"), Message(A, "Hello")], template=str(bad))
    # what went wrong, why it matters and what to do instead, each in the message
    msg = " ".join(str(err.value).split())
    assert "(a rendering of the first messages, or the generation prompt, is not a prefix" in msg
    assert "of the whole rendering), so loss masks cannot be derived from it." in msg
    assert "Use a built-in template (data.template: chatml, llama3, ...) or a .jinja file" in msg


def test_template_refusal_is_a_bad_record(tiny_tokenizer: Path, tmp_path: Path) -> None:
    from sft.data.conversation import RecordError

    strict = tmp_path / "strict.jinja"
    strict.write_text(
        "{% if messages[0]['content'] == 'no' %}{{ raise_exception('refused') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }};{% endfor %}"
    )
    tok = load_tok(tiny_tokenizer)
    enc = Encoder(tok, Renderer(resolve_template(str(strict), tok, get_plugins()), tok))
    out = enc.encode(
        [
            Conversation([Message(U, "no"), Message(A, "x")], "f:1"),
            Conversation([Message(U, "yes"), Message(A, "x")], "f:2"),
        ]
    )
    assert isinstance(out[0], RecordError) and out[0].kind == "template_error"
    assert not isinstance(out[1], RecordError)


OPACITY = {
    # content only printed, in + / ~ chains: substitution is exact
    "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '</s>' }}{% endfor %}": True,
    "{% for m in messages %}{{ m.role ~ ': ' ~ m.content }}{% endfor %}": True,
    "{% set ms = messages[1:] %}{% for m in ms %}{{ m['content'] }}{% endfor %}": True,
    "{% if messages|length > 2 %}x{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}": True,
    # the template looks at or transforms the content, or handles whole messages
    "{% for m in messages %}{{ m['content'] | trim }}{% endfor %}": False,
    "{% for m in messages %}{% if m.content is string %}{{ m.content }}{% endif %}{% endfor %}": False,
    "{% for m in messages %}{% if m['content'] == '' %}x{% endif %}{{ m['content'] }}{% endfor %}": False,
    "{% for m in messages %}{{ m['content'][:10] }}{% endfor %}": False,
    "{% for m in messages %}{% set c = m['content'] %}{{ c }}{% endfor %}": False,
    "{% for m in messages %}{{ m.get('content') }}{% endfor %}": False,
    "{% macro r(x) %}{{ x }}{% endmacro %}{% for m in messages %}{{ r(m['content']) }}{% endfor %}": False,
    "{% macro r(x) %}{{ x['content'] }}{% endmacro %}{% for m in messages %}{{ r(m) }}{% endfor %}": False,
    "{{ messages | tojson }}": False,
    "{% for m in messages %}{{ m }}{% endfor %}": False,
    "{{ (messages | first)['content'] | upper }}": False,
}


@pytest.mark.parametrize(("source", "opaque"), list(OPACITY.items()))
def test_content_opacity_is_read_from_the_template_syntax(source: str, opaque: bool) -> None:
    from sft.data.templates import compile_template, content_is_opaque

    assert content_is_opaque(source, compile_template(source).environment) is opaque


@pytest.mark.parametrize(
    ("name", "opaque"), [("chatml", True), ("alpaca", True), ("llama3", False)]
)
def test_builtin_template_opacity(tiny_tokenizer: Path, name: str, opaque: bool) -> None:
    tok = load_tok(tiny_tokenizer)
    enc = Encoder(tok, Renderer(resolve_template(name, tok, get_plugins()), tok))
    assert enc.shapes.opaque is opaque


def test_smollm2_template_is_opaque(smol_tokenizer: Path) -> None:
    tok = load_tok(smol_tokenizer)
    enc = Encoder(tok, Renderer(resolve_template("auto", tok, get_plugins()), tok))
    assert enc.shapes.opaque


@pytest.mark.parametrize("mask", ["assistant", "last", "all"])
def test_an_opaque_template_encodes_without_rendering_after_the_checks(
    tiny_tokenizer: Path, mask: str
) -> None:
    """After the first CHECKS conversations (compared with real renderings), a content-opaque
    template renders nothing per conversation, and the result still equals the real path."""
    from sft.data.encoder import Shapes, _chat_spans, _real_prefixes

    tok = load_tok(tiny_tokenizer)
    enc = Encoder(tok, Renderer(resolve_template("chatml", tok, get_plugins()), tok), mask)
    calls = []
    real_render = enc.render

    def counting(*a, **kw):
        calls.append(1)
        return real_render(*a, **kw)

    counting.template = real_render.template  # type: ignore[attr-defined]
    enc.render = counting  # type: ignore[assignment]
    convs = [
        [
            Message(S, f"sys {i}"),
            Message(U, f" q{i} \n"),
            Message(A, f"a {i}"),
            Message(U, "more"),
            Message(A, f"\tend {i} ", train=(i % 3 != 0) if mask != "all" else None),
        ]
        for i in range(Shapes.CHECKS + 8)
    ]
    for i, msgs in enumerate(convs):
        before = len(calls)
        got = enc.text_and_spans(Conversation(msgs, f"t:{i}"))
        if i >= Shapes.CHECKS:
            assert len(calls) == before, f"conversation {i} was rendered"
            want = _chat_spans(
                real_render, _real_prefixes(real_render, msgs), msgs, enc._trained(msgs), mask
            )
            assert got == want
    assert enc.shapes.enabled and enc.shapes.trusted()


def test_generation_prompts_are_slices_of_the_whole_rendering(tiny_tokenizer: Path) -> None:
    """Perf: every prefix a mask needs, the generation prompts before assistant turns included,
    is a slice of the substituted whole rendering, not a join of its own."""
    tok = load_tok(tiny_tokenizer)
    enc = Encoder(tok, Renderer(resolve_template("chatml", tok, get_plugins()), tok))
    roles = (S, U, A, U, A)
    assert all(enc.shapes._cut(roles, k, False) is not None for k in range(1, 6))
    assert all(enc.shapes._cut(roles, k, True) is not None for k in (2, 4))
    assert enc.shapes._cut(roles, 3, True) is None  # "<|im_start|>assistant" where a user turn is


def test_one_difference_in_the_checks_switches_the_shortcut_off_for_good(
    tiny_tokenizer: Path,
) -> None:
    """The substitution shortcut is trusted only after CHECKS matching conversations, and one
    mismatch among them turns it off for the rest of the run."""
    from sft.data.encoder import Shapes

    tok = load_tok(tiny_tokenizer)
    shapes = Encoder(tok, Renderer(resolve_template("chatml", tok, get_plugins()), tok)).shapes
    msgs = [Message(U, "Hi"), Message(A, "Hello")]
    for _ in range(Shapes.CHECKS - 1):
        shapes.confirm(True)
    assert shapes.checking() and not shapes.trusted()
    shapes.confirm(True)
    assert shapes.trusted() and shapes.prefixes(msgs, None) is not None
    shapes = Encoder(tok, Renderer(resolve_template("chatml", tok, get_plugins()), tok)).shapes
    shapes.confirm(False)
    for _ in range(Shapes.CHECKS):
        shapes.confirm(True)
    assert not shapes.trusted() and shapes.prefixes(msgs, None) is None
