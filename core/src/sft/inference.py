"""What trying a model means on any backend: decoding settings, the prompt (the model's own chat
template), where an answer ends (the run's eos ids), the interactive chat loop and the
`sft generate` / `sft chat` / `sft eval` commands. A backend brings only loading and
`generate_ids` (`sft_torch.generate`, `sft_mindspore.generate`).

    sampling = Sampling(max_new_tokens=64)
    ids = render_prompt(tokenizer, [{"role": "user", "content": "Hi"}])
    chat_loop("model X", lambda history: answer_of(history), system="Be brief.")
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.errors import SftError

Messages = list[dict[str, str]]


@dataclass
class Sampling:
    """Decoding settings: greedy when temperature is 0."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def render_prompt(tok: Any, messages: Messages) -> list[int]:
    """Token ids of `messages` plus the assistant generation prompt, via the saved template."""
    if not getattr(tok, "chat_template", None):
        raise SftError(
            "the tokenizer has no chat template; pass a model saved by sft or set "
            "data.template when training"
        )
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return an encoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def cut_at_eos(ids: list[int], eos_ids: list[int]) -> list[int]:
    """`ids` up to (not including) the first end-of-turn id."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[:i]
    return ids


def decode_answer(tok: Any, ids: list[int]) -> str:
    """The text of generated ids, special tokens dropped, stripped."""
    return str(tok.decode(ids, skip_special_tokens=True)).strip()


def saved_eos_ids(directory: Path) -> list[int] | None:
    """`eos_token_id` of `generation_config.json` in `directory` as a list; None when there is
    no such file or key (the backend then asks the tokenizer)."""
    gc = directory / "generation_config.json"
    if gc.is_file():
        eos = json.loads(gc.read_text()).get("eos_token_id")
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return None


def with_system(system: str | None, messages: Messages) -> Messages:
    """`messages` after a system message, if there is one."""
    return ([{"role": "system", "content": system}] if system else []) + messages


def chat_loop(source: str, reply: Callable[[Messages], str], system: str | None = None) -> None:
    """Read user turns from stdin until EOF or /exit; the history is kept between turns and
    `reply(history)` gives the assistant's next message."""
    history: Messages = with_system(system, [])
    print(f"chatting with {source}\n/reset clears the history, /exit (or Ctrl-D) quits")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = history[:1] if system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        answer = reply(history)
        history.append({"role": "assistant", "content": answer})
        print(f"assistant> {answer}", flush=True)
        sys.stdout.flush()
