"""Chat templates: the tokenizer's own Jinja template, a built-in one, or a user's .jinja file.

A built-in plugin: `chatml`, `llama2`, `llama3`, `vicuna_v1.1` and `alpaca` are registered through
`sft_register_chat_templates`, the hook a plugin uses to add more. `data.template` picks one:

    template: auto                  # the tokenizer's chat_template (error if it has none)
    template: llama3                # a built-in
    template: prompts/mine.jinja    # a file (relative to the config)

Templates are rendered exactly as `tokenizer.apply_chat_template` renders them (same Jinja
environment, same special-token variables), so masks computed here match what the model saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.errors import SftError
from sft.hookspecs import hookimpl

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% set system_message = '<<SYS>>\n' + messages[0]['content'] | trim + '\n<</SYS>>\n\n' %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = '' %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 %}{% set content = system_message + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content | trim + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

VICUNA = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] | trim + ' ' }}{% set loop_messages = messages[1:] %}"
    "{% else %}{{ 'A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user\\'s questions. ' }}"
    "{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] | trim + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] | trim + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

ALPACA = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\n\n' }}{% set loop_messages = messages[1:] %}"
    "{% else %}{{ 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n' }}"
    "{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

BUILTIN = {
    "chatml": (CHATML, "<|im_end|>"),
    "llama2": (LLAMA2, "{eos_token}"),
    "llama3": (LLAMA3, "<|eot_id|>"),
    "vicuna_v1.1": (VICUNA, "{eos_token}"),
    "alpaca": (ALPACA, "{eos_token}"),
}


@hookimpl
def sft_register_chat_templates(register: Any) -> None:
    for name, (source, stop) in BUILTIN.items():
        register(name, source, stop=stop)


@dataclass(frozen=True)
class Template:
    """A chosen chat template: where it came from and its Jinja source."""

    name: str
    """`auto (tokenizer)`, a built-in name or the file path."""
    source: str
    stop: str = ""
    """End-of-turn text when known (built-ins); otherwise derived from renderings."""


def resolve_template(spec: str, tokenizer: Any, plugins: Any) -> Template:
    """The template `data.template` names, for this tokenizer."""
    if spec == "auto":
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):  # several named templates: the default one
            source = source.get("default")
        if not source:
            raise SftError(
                "data.template is `auto` but the tokenizer has no chat template; set data.template "
                f"to a built-in ({', '.join(plugins.templates)}) or to a .jinja file"
            )
        return Template("auto (tokenizer)", source)
    if spec in plugins.templates:
        t = plugins.templates.get(spec)
        stop = t.stop.replace("{eos_token}", str(getattr(tokenizer, "eos_token", "") or ""))
        return Template(spec, t.source, stop)
    path = Path(spec)
    if path.is_file():
        return Template(str(path), path.read_text(encoding="utf-8"))
    raise SftError(
        f"data.template {spec!r} is neither a built-in ({', '.join(plugins.templates)}) "
        "nor an existing .jinja file"
    )


class Renderer:
    """Renders message lists with one compiled template, like `apply_chat_template(tokenize=False)`."""

    def __init__(self, template: Template, tokenizer: Any) -> None:
        self.template = template
        self._jinja = compile_template(template.source)
        self.environment = self._jinja.environment
        # The variables apply_chat_template passes: bos_token, eos_token, pad_token, ...
        # Built-ins use bos_token / eos_token; a tokenizer without one renders them empty.
        self._vars = {"bos_token": "", "eos_token": ""} | {
            k: v
            for k, v in getattr(tokenizer, "special_tokens_map", {}).items()
            if isinstance(v, str)
        }

    def __call__(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        try:
            return self._jinja.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self._vars
            )
        except Exception as exc:
            raise TemplateError(f"{type(exc).__name__}: {exc}") from exc


class TemplateError(Exception):
    """The template refused or failed to render a conversation (e.g. raise_exception)."""


def compile_template(source: str) -> Any:
    """A Jinja template compiled in transformers' own chat-template environment (sandboxed, same
    extensions, filters and globals), with the sandbox's attribute check memoized."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        base = _compile_jinja_template(source).environment
    except ImportError:  # pragma: no cover - a transformers that moved it; same settings here
        base = _own_environment()
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = base.overlay()
    # Memoize only the check we know depends on (type, name) alone, never a subclass's own.
    if type(base).is_safe_attribute is ImmutableSandboxedEnvironment.is_safe_attribute:
        env.is_safe_attribute = _memoized_safety(base.is_safe_attribute)
    return env.from_string(source)


def _memoized_safety(check: Any) -> Any:
    # The immutable sandbox decides from the object's type and the attribute name only
    # (private names, internal attributes of functions/frames/types, mutating methods of known
    # containers), so its answer can be cached per (type, name). Rendering a template thousands
    # of times spends a third of its time in this check otherwise.
    cache: dict[tuple[type, str], bool] = {}

    def is_safe_attribute(obj: Any, attr: str, value: Any) -> bool:
        key = (type(obj), attr)
        if key not in cache:
            cache[key] = bool(check(obj, attr, value))
        return cache[key]

    return is_safe_attribute


def _own_environment() -> Any:
    import json

    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    env.globals["raise_exception"] = raise_exception
    return env


def content_is_opaque(source: str, env: Any) -> bool:
    """Whether a chat template copies every message's content into its output verbatim and
    never looks at it: then a rendering of placeholder contents with the real contents
    substituted is exactly the real rendering, for every conversation with the same roles
    (`encoder.Shapes` then skips rendering each conversation). Decided on the Jinja syntax tree
    (`env`: the environment the template is compiled in), conservatively:

    - a message's `content` (`m['content']`, `m.content`) may only be printed, alone or in a
      `+` / `~` chain: `{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' }}`.
      A filter (`| trim`), a test (`is string`), a comparison, a `{% set %}`, a macro or method
      call on it makes the template not opaque;
    - `messages`, and every message taken from it (loop variables, `messages[1:]`,
      `messages[0]`), may only be subscripted for a field, looped over, measured (`| length`) or
      sliced into a `{% set %}`: a template that prints, serializes (`messages | tojson`) or
      passes whole messages to a macro is not opaque.

    False whenever in doubt; the caller then renders every conversation for real."""
    from jinja2 import nodes

    try:
        tree = env.parse(source)
    except Exception:
        return False
    parents: dict[int, Any] = {}
    stack: list[Any] = [tree]
    while stack:
        node = stack.pop()
        for child in node.iter_child_nodes():
            parents[id(child)] = node
            stack.append(child)
    names = {"messages"}

    def whole(node: Any) -> bool:
        """`node` evaluates to `messages`, a slice of it or one message."""
        while isinstance(node, nodes.Getitem):
            if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
                return False  # a field: m['role'], m['content']
            node = node.node  # messages[0], messages[i], messages[1:]
        if isinstance(node, nodes.Filter) and node.name in ("first", "last", "reverse"):
            return node.node is not None and whole(node.node)
        return isinstance(node, nodes.Name) and node.name in names

    for _ in range(4):  # names bound to messages (loops in loops: a small fixed point)
        for n in tree.find_all((nodes.For, nodes.Assign)):
            value = n.iter if isinstance(n, nodes.For) else n.node
            if isinstance(n.target, nodes.Name) and whole(value):
                names.add(n.target.name)

    for name in tree.find_all(nodes.Name):
        if name.name not in names or name.ctx != "load":
            continue
        child, up = name, parents.get(id(name))
        while up is not None and whole(up):  # through messages[0], messages[1:], | first
            child, up = up, parents.get(id(up))
        if isinstance(up, nodes.Getitem) and up.node is child:
            key = up.arg
            is_content = isinstance(key, nodes.Const) and key.value == "content"
            if is_content and not _printed(up, parents):
                return False
            continue  # another field (role, ...): the role sequence is part of the shape
        if isinstance(up, nodes.Getattr) and up.node is child:
            call = parents.get(id(up))
            if isinstance(call, nodes.Call) and call.node is up:
                return False  # m.get('content'), messages.index(m): a method call
            if up.attr == "content" and not _printed(up, parents):
                return False
            continue
        if isinstance(up, nodes.For) and up.iter is child:
            continue
        if isinstance(up, nodes.Assign) and up.node is child:
            continue  # {% set loop_messages = messages[1:] %}: its uses are checked by name
        if isinstance(up, nodes.Filter) and up.node is child and up.name in ("length", "count"):
            continue
        if isinstance(up, nodes.Test) and up.node is child and up.name in ("defined", "undefined"):
            continue
        return False
    return True


def _printed(node: Any, parents: dict[int, Any]) -> bool:
    """`node` is printed as is, alone or inside a chain of string concatenations."""
    from jinja2 import nodes

    up = parents.get(id(node))
    while isinstance(up, (nodes.Add, nodes.Concat)):
        up = parents.get(id(up))
    return isinstance(up, nodes.Output)
