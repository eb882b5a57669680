"""Token ids and loss masks for any chat template, derived from the rendering itself.

For a conversation m0..mn the template renders prefixes m[:i] (with and without the generation
prompt); each must be a prefix of the full rendering, so the differences are exactly the
characters each message added. For an assistant message that is

    render(m[:i], add_generation_prompt=True)  ->  the header ("<|im_start|>assistant\\n"), masked
    up to render(m[:i+1])                      ->  content + end-of-turn marker, trained

(trailing whitespace after the marker, such as chatml's "\\n", stays masked). The full rendering
is tokenized once and character spans map to tokens (labels.py: through the tokenizer's offsets,
or byte lengths for byte-level BPE), so the ids are exactly
`tokenizer(render(m), add_special_tokens=False)`. A token that straddles a boundary is trained
if any of its characters is. Labels are the token id where trained, -100 elsewhere, not shifted:

    enc = Encoder(tokenizer, renderer, mask="assistant")
    ids, labels = enc.encode([conv])[0]
    # chatml: <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n
    # labels:   -100 ... -100                                        Hello <|im_end|>  -100
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from sft.data.conversation import Conversation, Message, RecordError
from sft.data.labels import Labeller, Spans
from sft.data.templates import Renderer, TemplateError, content_is_opaque
from sft.errors import SftError


class Encoder:
    """Conversations -> (ids, labels) with one tokenizer, template and mask policy."""

    def __init__(
        self,
        tokenizer: Any,
        renderer: Renderer,
        mask: str = "assistant",
        system_prompt: str | None = None,
    ) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise SftError(
                f"tokenizer {type(tokenizer).__name__} is not a fast (Rust) tokenizer; sft needs "
                "character offsets: save the model with a tokenizer.json"
            )
        self.tok, self.backend, self.render = tokenizer, backend, renderer
        self.mask, self.system_prompt = mask, system_prompt
        self.eos_text = tokenizer.eos_token or ""
        # Plain text gets the BOS the tokenizer would add itself (llama-style tokenizers).
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
        self.bos_text = tokenizer.bos_token if adds_bos else ""
        self.shapes = Shapes(renderer)
        self.labeller = Labeller(backend)

    def text_and_spans(self, conv: Conversation) -> tuple[str, Spans]:
        """The rendered text and its trained character spans; raises RecordError."""
        if conv.plain:
            return self._plain(conv)
        msgs = list(conv.messages)
        if self.system_prompt and msgs[0].role != "system":
            msgs.insert(0, Message("system", self.system_prompt))
        trained = self._trained(msgs)
        real = _real_prefixes(self.render, msgs)
        if self.shapes.trusted():  # no rendering at all (content-opaque template, checked)
            fast = self.shapes.prefixes(msgs, None)
        else:
            # `all` needs just the full rendering; opaque templates still warm up the shortcut
            use = self.mask != "all" or self.shapes.opaque
            fast = self.shapes.prefixes(msgs, real(len(msgs))) if use else None
        if fast is None:
            return _chat_spans(self.render, real, msgs, trained, self.mask)
        try:
            result = _chat_spans(self.render, fast, msgs, trained, self.mask)
        except _NoShape:
            return _chat_spans(self.render, real, msgs, trained, self.mask)
        if self.shapes.checking():  # the first fast results are compared with real renderings
            checked = _chat_spans(self.render, real, msgs, trained, self.mask)
            self.shapes.confirm(result == checked)
            return checked
        return result

    def _trained(self, msgs: Sequence[Message]) -> list[bool]:
        last = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=-1)
        out = []
        for i, m in enumerate(msgs):
            default = self.mask == "all" or (
                m.role == "assistant" and (self.mask == "assistant" or i == last)
            )
            out.append(default if m.train is None else m.train)
        return out

    def _plain(self, conv: Conversation) -> tuple[str, Spans]:
        text, spans = self.bos_text, []
        trained = self._trained(conv.messages)
        for m, t in zip(conv.messages, trained, strict=True):
            if t:
                spans.append((len(text), len(text) + len(m.content)))
            text += m.content
        if trained[-1]:  # EOS belongs to the last piece: the model learns where text ends
            spans.append((len(text), len(text) + len(self.eos_text)))
        text += self.eos_text
        if self.mask == "all" and not any(m.train is False for m in conv.messages):
            spans = [(0, len(text))]
        return text, spans

    def encode(
        self, convs: Sequence[Conversation]
    ) -> list[tuple[np.ndarray, np.ndarray] | RecordError]:
        """Encode many conversations with one batched tokenizer call; bad ones give RecordError."""
        texts: list[str] = []
        spans: list[Spans] = []
        out: list[RecordError | None] = []
        for conv in convs:
            try:
                t, s = self.text_and_spans(conv)
            except RecordError as exc:
                out.append(exc)
                continue
            out.append(None)
            texts.append(t)
            spans.append(s)
        encoded = iter(self.labeller(texts, spans))
        return [item if item is not None else next(encoded) for item in out]


def _real_prefixes(render: Renderer, msgs: list[Message]) -> Any:
    """prefix(k, gen): the template's rendering of the first k messages (memoized)."""
    cache: dict[tuple[int, bool], str] = {}
    dicts: list[dict[str, str]] = []  # built on first use: the Shapes path may never render

    def prefix(k: int, gen: bool = False) -> str:
        if k == 0 and not gen:
            return ""
        if (k, gen) not in cache:
            if not dicts:
                dicts.extend({"role": m.role, "content": m.content} for m in msgs)
            try:
                cache[k, gen] = render(dicts[:k], add_generation_prompt=gen)
            except TemplateError as exc:
                raise RecordError(
                    "template_error", f"the chat template refused it: {exc}"
                ) from None
        return cache[k, gen]

    return prefix


def _chat_spans(
    render: Renderer, prefix: Any, msgs: list[Message], trained: list[bool], mask: str
) -> tuple[str, Spans]:
    full = prefix(len(msgs))
    if mask == "all":  # everything except the whole turns switched off with `train: false`
        off = [_bounds(render, prefix, full, i, False) for i, t in enumerate(trained) if not t]
        return full, _complement(off, len(full))
    spans = [
        _bounds(render, prefix, full, i, m.role == "assistant")
        for i, m in enumerate(msgs)
        if trained[i]
    ]
    for (_, end), (start, _) in itertools.pairwise(spans):
        if start < end:
            _not_incremental(render)
    return full, spans


def _bounds(
    render: Renderer, prefix: Any, full: str, i: int, trained_part: bool
) -> tuple[int, int]:
    """Characters of message i: the whole turn, or (trained_part) from the end of the
    generation prompt to the end-of-turn marker, without the whitespace after it."""
    start = prefix(i, True) if trained_part else prefix(i)
    after = prefix(i + 1)
    if not (full.startswith(start) and full.startswith(after) and len(start) <= len(after)):
        _not_incremental(render)
    end = len(after.rstrip()) if trained_part else len(after)
    return len(start), max(end, len(start))


def _not_incremental(render: Renderer) -> None:
    raise SftError(
        f"chat template {render.template.name!r} does not render conversations incrementally "
        "(a rendering of the first messages, or the generation prompt, is not a prefix of the "
        "whole rendering), so loss masks cannot be derived from it. Use a built-in template "
        "(data.template: chatml, llama3, ...) or a .jinja file that does not rewrite history"
    )


_SLOT = re.compile("\ue000(\\d+)\ue001")


class Shapes:
    """Prefix renderings per role sequence, with placeholder contents, filled in by substitution.

    Rendering every prefix of every conversation costs about two template renders per assistant
    turn. Most templates treat a message's content as opaque text, so the prefixes of a
    conversation with roles (system, user, assistant, ...) are the prefixes of a placeholder
    conversation with the same roles, with the contents substituted. That is used only when the
    substituted full rendering equals the conversation's real full rendering (rendered for every
    conversation); otherwise, e.g. for templates that trim or inspect content, the real prefixes
    are rendered. The first CHECKS uses are also compared with the real prefixes, and any
    difference switches the shortcut off for good.

    When the template's syntax tree shows it only ever prints contents verbatim
    (`templates.content_is_opaque`: chatml, alpaca and SmolLM2's own template; not
    llama3's, which trims), the real full rendering is skipped too after the first CHECKS
    conversations, so a conversation costs no template render at all (docs/performance.md).
    """

    CHECKS = 32

    def __init__(self, render: Renderer) -> None:
        self.render = render
        self.enabled = True
        self.checked = 0
        self.opaque = content_is_opaque(render.template.source, render.environment)
        self._pieces: dict[tuple[tuple[str, ...], int, bool], list[str] | None] = {}
        self._rendered: dict[tuple[tuple[str, ...], int, bool], str | None] = {}
        self._cuts: dict[tuple[tuple[str, ...], int, bool], tuple[int, int] | None] = {}

    def prefixes(self, msgs: list[Message], full: str | None) -> Any:
        """A prefix(k, gen) function by substitution, or None where it does not apply. `full`:
        the real rendering the substituted one must equal (None: trusted without it)."""
        if not self.enabled or any("\ue000" in m.content for m in msgs):
            return None
        roles = tuple(m.role for m in msgs)
        contents = [m.content for m in msgs]
        pieces = self._shape(roles, len(msgs), False)
        if pieces is None:
            return None
        sub = [p if j % 2 == 0 else contents[int(p)] for j, p in enumerate(pieces)]
        whole = "".join(sub)
        if full is not None and whole != full:
            return None
        # Perf: a prefix that the placeholder renderings show to be a prefix of the whole one is
        # a slice of the substituted whole rendering (one join per conversation, not one per
        # prefix); any other prefix is substituted on its own.
        ends = list(itertools.accumulate(map(len, sub), initial=0))

        def prefix(k: int, gen: bool = False) -> str:
            if k == 0 and not gen:
                return ""
            cut = self._cut(roles, k, gen)
            if cut is not None:
                return whole[: ends[cut[0]] + cut[1]]
            part = self._shape(roles, k, gen)
            if part is None:
                raise _NoShape
            return "".join(p if j % 2 == 0 else contents[int(p)] for j, p in enumerate(part))

        return prefix

    def _cut(self, roles: tuple[str, ...], k: int, gen: bool) -> tuple[int, int] | None:
        """Where the placeholder rendering of prefix (k, gen) ends inside the whole one: (pieces
        wholly inside, characters of the next literal piece), or None if it is not a prefix of
        it or ends inside a placeholder. A generation prompt ends right before the next
        message's placeholder: (its index, 0)."""
        key = (roles, k, gen)
        if key not in self._cuts:
            self._cuts[key] = None
            whole, part = self._raw(roles, len(roles), False), self._raw(roles, k, gen)
            if whole is not None and part is not None and whole.startswith(part):
                pos, n = 0, len(part)
                pieces = self._pieces[(roles, len(roles), False)] or []
                for j, p in enumerate(pieces):
                    width = len(p) if j % 2 == 0 else len(f"\ue000{p}\ue001")
                    if pos + width > n:
                        self._cuts[key] = (j, n - pos) if j % 2 == 0 or pos == n else None
                        break
                    pos += width
                else:
                    self._cuts[key] = (len(pieces), 0)
        return self._cuts[key]

    def _raw(self, roles: tuple[str, ...], k: int, gen: bool) -> str | None:
        self._shape(roles, k, gen)
        return self._rendered[(roles, k, gen)]

    def _shape(self, roles: tuple[str, ...], k: int, gen: bool) -> list[str] | None:
        key = (roles, k, gen)
        if key not in self._pieces:
            slots = [{"role": r, "content": f"\ue000{i}\ue001"} for i, r in enumerate(roles[:k])]
            try:
                raw = self.render(slots, add_generation_prompt=gen)
            except TemplateError:
                raw = None
            self._rendered[key] = raw
            self._pieces[key] = None if raw is None else _SLOT.split(raw)
        return self._pieces[key]

    def checking(self) -> bool:
        return self.checked < self.CHECKS

    def trusted(self) -> bool:
        """Substitute without rendering the conversation at all: the template provably never
        looks at a message's content (`templates.content_is_opaque`) and the first CHECKS
        conversations matched their real renderings."""
        return self.opaque and self.enabled and not self.checking()

    def confirm(self, same: bool) -> None:
        self.checked += 1
        self.enabled = self.enabled and same


class _NoShape(Exception):
    pass


def _complement(spans: Spans, n: int) -> Spans:
    out, pos = [], 0
    for a, b in sorted(spans):
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < n:
        out.append((pos, n))
    return out
