"""Record formats (alpaca, sharegpt, messages, prompt_completion, text) -> Conversation.

A built-in plugin: the converters are registered through `sft_register_dataset_formats`, the
same hook a third-party format uses. One record of each:

    alpaca             {"instruction": "Add 2 and 2", "input": "", "output": "4",
                        "system": "(optional)", "history": [["(optional) q", "a"]]}
    sharegpt           {"conversations": [{"from": "human", "value": "Hi"},
                                          {"from": "gpt", "value": "Hello!"}], "system": "(opt)"}
    messages           {"messages": [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello!"}]}
    prompt_completion  {"prompt": "The sky is", "completion": " blue."}   (or message lists)
    text               {"text": "Raw text for continued pre-training."}

    conv = convert_record(get_plugins(), source, record, where="a.jsonl:3")
"""

from __future__ import annotations

from typing import Any

from sft.data.conversation import ROLES, Conversation, Message, RecordError
from sft.hookspecs import hookimpl

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}


def _field(record: dict[str, Any], name: str, required: bool = True) -> Any:
    value = record.get(name)
    if value is None and required:
        have = ", ".join(sorted(record)) or "none"
        raise RecordError("missing_field", f"missing field {name!r} (fields: {have})")
    return value


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: keep text parts, refuse others
        parts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise RecordError("wrong_type", f"{what}: only text content parts are supported")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise RecordError("wrong_type", f"{what} must be a string, got {type(value).__name__}")


def _role(raw: Any, roles: dict[str, str], default: dict[str, str]) -> str:
    name = str(raw)
    role = roles.get(name) or default.get(name) or name
    if role not in ROLES:
        known = sorted(set(default) | set(roles))
        raise RecordError(
            "unknown_role", f"unknown role {name!r} (known: {', '.join(known)}; map it with roles:)"
        )
    return role


def _train_flag(msg: dict[str, Any]) -> bool | None:
    flag = msg.get("train", msg.get("weight"))
    if flag is None:
        return None
    if isinstance(flag, bool) or flag in (0, 1):
        return bool(flag)
    raise RecordError("wrong_type", f"`train` must be true or false, got {flag!r}")


def _message_list(
    items: Any,
    what: str,
    role_key: str,
    content_key: str,
    roles: dict[str, str],
    default: dict[str, str],
) -> list[Message]:
    if not isinstance(items, list):
        raise RecordError("wrong_type", f"{what} must be a list of messages")
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise RecordError("wrong_type", f"{what}[{i}] must be an object")
        if role_key not in m:
            raise RecordError("missing_field", f"{what}[{i}] has no {role_key!r}")
        role = _role(m[role_key], roles, default)
        out.append(Message(role, _text(m.get(content_key), f"{what}[{i}]"), _train_flag(m)))
    return out


def alpaca(record: dict[str, Any], source: Any = None) -> Conversation:
    instruction = _text(_field(record, "instruction"), "instruction")
    extra = _text(record.get("input"), "input")
    output = _text(_field(record, "output"), "output")
    msgs: list[Message] = []
    if record.get("system"):
        msgs.append(Message("system", _text(record["system"], "system")))
    for turn in record.get("history") or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise RecordError("wrong_type", "history must be a list of [query, response] pairs")
        msgs += [
            Message("user", _text(turn[0], "history")),
            Message("assistant", _text(turn[1], "history")),
        ]
    user = f"{instruction}\n{extra}" if extra.strip() else instruction
    msgs += [Message("user", user), Message("assistant", output)]
    return Conversation(msgs)


def sharegpt(record: dict[str, Any], source: Any = None) -> Conversation:
    roles = getattr(source, "roles", None) or {}
    items = _field(record, "conversations")
    msgs = _message_list(items, "conversations", "from", "value", roles, SHAREGPT_ROLES)
    if record.get("system") and not (msgs and msgs[0].role == "system"):
        msgs.insert(0, Message("system", _text(record["system"], "system")))
    return Conversation(msgs)


def messages(record: dict[str, Any], source: Any = None) -> Conversation:
    """OpenAI chat format; other fields (Qwen's `type`, `source`) are kept as metadata."""
    roles = getattr(source, "roles", None) or {}
    msgs = _message_list(_field(record, "messages"), "messages", "role", "content", roles, {})
    return Conversation(msgs, meta={k: v for k, v in record.items() if k != "messages"})


def prompt_completion(record: dict[str, Any], source: Any = None) -> Conversation:
    """Strings: raw text, the completion trained (+ EOS). Message lists: a conversation."""
    prompt, completion = _field(record, "prompt"), _field(record, "completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return Conversation([Message("user", prompt), Message("assistant", completion)], plain=True)
    roles = getattr(source, "roles", None) or {}
    msgs = _message_list(prompt, "prompt", "role", "content", roles, {})
    msgs += _message_list(completion, "completion", "role", "content", roles, {})
    return Conversation(msgs)


def text(record: dict[str, Any], source: Any = None) -> Conversation:
    """Continued pre-training: every token trained, EOS appended."""
    return Conversation([Message("assistant", _text(_field(record, "text"), "text"))], plain=True)


DETECT = {
    "messages": lambda r: isinstance(r.get("messages"), list),
    "sharegpt": lambda r: isinstance(r.get("conversations"), list),
    "alpaca": lambda r: "instruction" in r and "output" in r,
    "prompt_completion": lambda r: "prompt" in r and "completion" in r,
    "text": lambda r: isinstance(r.get("text"), str),
}


@hookimpl
def sft_register_dataset_formats(register: Any) -> None:
    for fn in (messages, sharegpt, alpaca, prompt_completion, text):
        register(fn.__name__, fn, detect=DETECT[fn.__name__])


def detect_format(plugins: Any, record: dict[str, Any], where: str) -> str:
    """The first registered format whose detector accepts `record` (built-ins first)."""
    builtin = [n for n in DETECT if n in plugins.formats]
    others = [n for n in plugins.formats if n not in DETECT]
    for name in builtin + others:
        fmt = plugins.formats.get(name)
        if fmt.detect is not None and fmt.detect(record):
            return name
    from sft.errors import SftError

    raise SftError(
        f"{where}: cannot detect the data format from fields {sorted(record)}; set `format:` "
        f"({', '.join(plugins.formats)}) and map columns with `columns:` if they are named differently"
    )


def convert_record(
    plugins: Any, fmt: str, source: Any, record: dict[str, Any], where: str
) -> Conversation:
    """Record -> checked Conversation tagged with `where`; raises RecordError."""
    conv = plugins.formats.get(fmt).convert(record, source)
    if not isinstance(conv, Conversation):
        raise RecordError("wrong_type", f"format {fmt!r} returned {type(conv).__name__}")
    conv.source = where
    return conv.check()
