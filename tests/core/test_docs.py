"""The README and docs are tested: every job spec they show validates, and every command of the
README's tour exists with the options it shows.

A `yaml` block with a top-level `data:` key is a job spec: it must validate (with the backend it
names, `torch` by default) once the files it refers to exist. A block that is only a backend's
section (`mindspore:`, `torch:`) must validate against that backend's options model.

    $ .venvs/torch/bin/python -m pytest tests/core/test_docs.py -q
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from sft.config import load_config
from sft.plugins import get_plugins

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def yaml_blocks() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for n, m in enumerate(re.finditer(r"```yaml\n(.*?)```", text, re.S)):
            line = text[: m.start()].count("\n") + 1
            out.append((f"{doc.relative_to(ROOT)}:{line}#{n}", m.group(1)))
    return out


def _materialize(value: str, base: Path) -> None:
    """Create the file (or directory, or a match of the glob) a doc example refers to."""
    if value.startswith(("/", "~")) or "://" in value:
        return
    path = base / value
    if any(c in value for c in "*?["):
        path = base / value.replace("*", "example").replace("?", "x")
    if path.suffix:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    else:
        path.mkdir(parents=True, exist_ok=True)


def _files_of(spec: dict[str, Any]) -> list[str]:
    data = spec.get("data") or {}
    files = []
    for key in ("train", "eval"):
        srcs = data.get(key)
        for src in srcs if isinstance(srcs, list) else [srcs]:
            path = src.get("path") if isinstance(src, dict) else src
            if isinstance(src, dict) and "revision" in src:
                continue  # a hub dataset id (revision is for those only): nothing local
            if isinstance(path, str):
                files.append(path)
    tpl = data.get("template")
    if isinstance(tpl, str) and tpl.endswith(".jinja"):
        files.append(tpl)
    prompts = (spec.get("eval") or {}).get("prompts")
    if isinstance(prompts, str):
        files.append(prompts)
    return files


@pytest.mark.parametrize("where,block", yaml_blocks(), ids=[w for w, _ in yaml_blocks()])
def test_doc_yaml_validates(where: str, block: str, tmp_path: Path) -> None:
    spec = yaml.safe_load(block)
    assert isinstance(spec, dict), f"{where}: a yaml block must be a mapping"
    from sft.config import KNOWN_BACKENDS
    from sft.specs import RunConfig

    plugins = get_plugins()
    backends = set(plugins.backends) | set(KNOWN_BACKENDS)
    if "data" not in spec and set(spec) <= backends:  # a backend's own section
        for section, values in spec.items():
            if section not in plugins.backends:
                pytest.skip(f"{where}: section {section!r} needs a backend not installed here")
            plugins.backends.get(section).Options.model_validate(values or {})
        return
    assert set(spec) <= set(RunConfig.model_fields) | backends, f"{where}: not a job spec"
    if "data" not in spec:  # a fragment of sections: validated inside a minimal job
        spec["data"] = {"train": "data/train.jsonl"}
        block = yaml.safe_dump(spec)
    backend = spec.get("backend", "torch")
    if backend not in plugins.backends:
        pytest.skip(f"{where}: backend {backend!r} is not installed in this environment")
    for value in _files_of(spec):
        _materialize(value, tmp_path)
    method = spec.get("method")
    if isinstance(method, dict) and isinstance(method.get("init_adapter"), str):
        adapter = tmp_path / method["init_adapter"]  # a PEFT adapter directory
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "job.yaml").write_text(block)
    config = load_config(tmp_path / "job.yaml")
    assert config.backend == backend


# ----------------------------------------------------------------------------- the tour


def tour_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    tour = text.split("## A tour", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", tour, re.S)
    assert block, "README's tour has no bash block"
    lines, pending = [], ""
    for raw in block.group(1).splitlines():
        line = raw.split("  #", 1)[0].strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        if pending + line:
            lines.append(" ".join((pending + line).split()))
        pending = ""
    return lines


#: Commands that another environment registers (a backend's own commands).
ENV_OF = {"convert": "mindspore", "chat": "torch", "eval": "torch", "bench": "torch"}


def _sft_args(line: str) -> list[str]:
    words = shlex.split(line)
    if words[0] == "torchrun":  # torchrun ... -m sft run ...
        words = words[words.index("sft") :]
    assert words[0] == "sft", line
    return words[1:]


def _resolve(cmd: click.Command, args: list[str]) -> tuple[click.Command, list[str], list[str]]:
    """(the command, its path, the remaining args) for `args` of the `sft` group."""
    path = []
    while hasattr(cmd, "commands") and args and args[0] in cmd.commands:
        path.append(args[0])
        cmd, args = cmd.commands[args[0]], args[1:]
    return cmd, path, args


@pytest.mark.parametrize("line", tour_lines())
def test_tour_command_exists_with_its_options(line: str) -> None:
    from sft.cli import _command

    args = _sft_args(line)
    cmd, path, rest = _resolve(_command(), args)
    if not path or hasattr(cmd, "commands"):
        if args[0] in ENV_OF:
            pytest.skip(f"`sft {args[0]}` is registered by the {ENV_OF[args[0]]} backend")
        pytest.fail(f"README tour: `{line}`: no such command")
    known = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
    shown = [a.split("=", 1)[0] for a in rest if a.startswith("-")]
    missing = [o for o in shown if o not in known]
    assert not missing, f"`{line}`: sft {' '.join(path)} has no option(s) {missing}"
    ctx = cmd.make_context("sft " + " ".join(path), list(rest), resilient_parsing=True)
    if path == ["run"] or path == ["config", "validate"]:
        _validates(ctx.params)


def _validates(params: dict[str, Any]) -> None:
    """A tour line that runs a config: the config with its overrides validates on the backend
    it names (where that backend is installed). The shipped configs name the built-in model,
    which only the torch environment converts, so that one problem is tolerated elsewhere."""
    from sft.errors import ConfigError

    backend = params.get("backend") or "torch"
    if backend not in get_plugins().backends:
        pytest.skip(f"backend {backend!r} is not installed in this environment")
    overrides = list(params.get("overrides") or [])
    try:
        if params.get("config") is None:  # the quick start: --model/--data build the spec
            from sft.cli import quick_start_overrides

            data = str(ROOT / params["data"]) if params.get("data") else None
            quick = quick_start_overrides(None, params.get("model"), data, params.get("method"), [])
            load_config(None, quick + overrides, backend)
        else:
            load_config(ROOT / params["config"], overrides, backend)
    except ConfigError as exc:
        rest = [p for p in exc.problems if p.path != "model.name_or_path"]
        assert not rest, str(exc)
