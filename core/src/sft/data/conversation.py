"""The neutral record: a Conversation of role/content messages, whatever the file format was.

Every format converter (`sft.data.formats`, or a plugin's) turns one raw record into a
`Conversation` or raises `RecordError`; everything after that (templates, masks, length policy)
only ever sees Conversations.

    conv = Conversation(
        [Message("user", "What is 2+2?"), Message("assistant", "4")], source="train.jsonl:3"
    )
    conv.check()          # raises RecordError("bad_role_order", ...) for a malformed one
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant", "tool")


class RecordError(Exception):
    """A record that cannot become a Conversation. `kind` is a short, countable reason
    (`malformed_json`, `invalid_utf8`, `missing_field`, `unknown_role`, `bad_role_order`,
    `empty_content`, `wrong_type`); `reason` says what exactly is wrong, for people."""

    def __init__(self, kind: str, reason: str = "") -> None:
        self.kind = kind
        self.reason = reason or kind
        super().__init__(self.reason)


@dataclass
class Message:
    role: str
    """One of `system`, `user`, `assistant`, `tool`."""
    content: str
    train: bool | None = None
    """Per-message override of the mask policy: True trains it, False masks it, None follows
    `data.mask`."""


@dataclass
class Conversation:
    messages: list[Message]
    source: str = ""
    """Where the record came from, `file:line` (or `file:row` for columnar files)."""
    plain: bool = False
    """Raw text without a chat template (formats `text` and string `prompt_completion`): the
    contents are concatenated and an EOS token is appended."""
    meta: dict[str, object] = field(default_factory=dict)

    def check(self) -> Conversation:
        """Raise RecordError unless roles are known, ordered sensibly and contents non-empty."""
        if not self.messages:
            raise RecordError("missing_field", "no messages")
        prev = None
        for i, m in enumerate(self.messages):
            if m.role not in ROLES:
                raise RecordError("unknown_role", f"message {i}: unknown role {m.role!r}")
            if not isinstance(m.content, str):
                raise RecordError("wrong_type", f"message {i}: content must be a string")
            if m.role in ("user", "assistant") and not m.content.strip():
                raise RecordError("empty_content", f"message {i} ({m.role}) has empty content")
            if not self.plain:
                _check_order(i, m.role, prev)
            prev = m.role
        return self

    def to_dicts(self) -> list[dict[str, str]]:
        """The messages as chat-template input."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


def _check_order(i: int, role: str, prev: str | None) -> None:
    # Chat templates assume: an optional leading system message, then a user turn, then
    # alternating turns (tool results only right after an assistant turn or another tool result).
    bad = (
        (role == "system" and i != 0)
        or (role == "assistant" and prev in (None, "system", "assistant"))
        or (role == "user" and prev == "user")
        or (role == "tool" and prev not in ("assistant", "tool"))
    )
    if bad:
        after = f"after {prev!r}" if prev else "first"
        raise RecordError("bad_role_order", f"message {i}: role {role!r} cannot come {after}")
