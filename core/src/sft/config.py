"""Loading a job spec: YAML + `key.sub=value` overrides + `--backend`, validated all at once.

    from sft.config import load_config
    config = load_config("configs/smollm2-135m/lora.yaml", ["train.max_steps=10"], backend=None)

Every problem (unknown keys with a suggestion, bad values with the allowed ones, a method the
backend cannot run, missing data files ...) is collected into one `ConfigError`.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sft import trackers
from sft.data.sources import DATASETS_INSTALL, is_dataset_repo, looks_like_hub_id
from sft.errors import ConfigError, Problem, SftError, did_you_mean
from sft.plugins import Plugins, get_plugins
from sft.specs import METHOD_NAMES, DataSource, RunConfig

#: Backends that ship with sft, listed even when not installed (with their install command).
KNOWN_BACKENDS = {
    "torch": "pip install -e backends/torch   (or: make venv-torch)",
    "mindspore": "pip install -e backends/mindspore   (or: make venv-ms)",
}


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from `path`, with a clear error for syntax mistakes."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SftError(f"config file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise SftError(
            f"config file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:  # a directory, no permission ...
        raise SftError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:  # absurdly deep nesting
        raise ConfigError([Problem(str(path), "invalid YAML: nested too deeply")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", exc)
        raise ConfigError([Problem(where, f"invalid YAML: {problem}")]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([Problem(str(path), "a config must be a YAML mapping of sections")])
    return data


#: Sections that a YAML may give as a plain string, and the key that string stands for.
SHORTHANDS = {"model": "name_or_path", "method": "name"}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> list[Problem]:
    """Set `a.b.c=value` items (values parsed as YAML) into `data`; returns problems."""
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(Problem(item, "an override must look like key.sub=value"))
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if i == 0 and isinstance(child, str) and part in SHORTHANDS:
                # `model: NAME` / `method: lora` in the YAML, `model.dtype=...` on the line
                child = node[part] = {SHORTHANDS[part]: child}
            if not isinstance(child, dict):
                problems.append(
                    Problem(
                        ".".join(parts[: i + 1]), f"is {child!r}, not a section: cannot set {key}"
                    )
                )
                break
            node = child
        else:
            node[parts[-1]] = value
    return problems


def _loc(loc: tuple[Any, ...]) -> str:
    # pydantic puts the discriminator value in the path (method.lora.r); users wrote method.r.
    parts = [str(p) for p in loc if not (isinstance(p, str) and p in METHOD_NAMES)]
    return ".".join(parts)


def pydantic_problems(
    exc: ValidationError, prefix: str = "", model: type[BaseModel] = RunConfig
) -> list[Problem]:
    """One Problem per pydantic error, with key path, bad value and a suggestion."""
    problems = []
    for err in exc.errors():
        if err["type"] == "union_tag_invalid":
            err["loc"] = (*err["loc"], "name")
        path = _loc(((prefix,) if prefix else ()) + tuple(err["loc"]))
        kind, msg, value = err["type"], err["msg"], err.get("input")
        hint = ""
        if kind == "extra_forbidden":
            parent_loc, key = tuple(err["loc"][:-1]), str(err["loc"][-1])
            fields = _fields_at(model, parent_loc)
            guess = did_you_mean(key, fields)
            msg = "unknown key"
            hint = f"did you mean {guess!r}?" if guess else f"allowed: {', '.join(sorted(fields))}"
        elif kind == "union_tag_invalid":
            tag = value.get("name") if isinstance(value, dict) else value
            msg = f"unknown method {tag!r}"
            guess = did_you_mean(str(tag), METHOD_NAMES)
            hint = (
                f"did you mean {guess!r}? " if guess else ""
            ) + f"allowed: {', '.join(METHOD_NAMES)}"
        elif kind == "literal_error":
            expected = str(err.get("ctx", {}).get("expected", ""))
            guess = did_you_mean(
                str(value), [e.strip(" '") for e in expected.replace(" or ", ",").split(",")]
            )
            msg = f"got {value!r}; expected {expected}"
            hint = f"did you mean {guess!r}?" if guess else ""
        elif not isinstance(value, (dict, list)) and value is not None and kind != "missing":
            msg = f"{msg} (got {value!r})"
        problems.append(Problem(path, msg, hint))
    return problems


def _fields_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model at `loc` inside `root` (for did-you-mean on unknown keys)."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        if isinstance(part, str) and part in METHOD_NAMES:
            from sft import specs

            model = {
                "full": specs.FullMethod,
                "lora": specs.LoraMethod,
                "qlora": specs.QLoraMethod,
                "freeze": specs.FreezeMethod,
            }[part]
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        model = _unwrap_model(ann)
        if model is None:
            return []
    fields = list(getattr(model, "model_fields", {}))
    if model is RunConfig:
        fields = [f for f in fields if f != "backend_options"]
    return fields


def _unwrap_model(ann: Any) -> Any:
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _resolve_path(value: str, base: Path) -> str:
    if "\0" in value:  # no file has such a name; left as is, the file checks report it
        return value
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else (base / p).resolve())


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or value.endswith((".gguf", ".jinja"))


def _resolve_data_path(value: str, base: Path) -> str:
    # `org/name` that is nothing under the config's directory stays a hub dataset id
    resolved = _resolve_path(value, base)
    if looks_like_hub_id(value) and not os.path.exists(resolved):
        return value
    return resolved


def resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make config-relative paths absolute (data sources, templates, prompts, model files)."""
    d = data.get("data")
    if isinstance(d, dict):
        for key in ("train", "eval"):
            srcs = d.get(key)
            items = srcs if isinstance(srcs, list) else [srcs]
            for i, src in enumerate(items):
                if isinstance(src, str):
                    items[i] = _resolve_data_path(src, base)
                elif isinstance(src, dict) and isinstance(src.get("path"), str):
                    src["path"] = _resolve_data_path(src["path"], base)
            if srcs is not None:
                d[key] = items if isinstance(srcs, list) else items[0]
        tpl = d.get("template")
        if isinstance(tpl, str) and _looks_like_path(tpl):
            d["template"] = _resolve_path(tpl, base)
    m = data.get("model")
    name = m if isinstance(m, str) else (m.get("name_or_path") if isinstance(m, dict) else None)
    # os.path.exists, not Path.exists: a name longer than NAME_MAX must not raise
    if isinstance(name, str) and (_looks_like_path(name) or os.path.exists(base / name)):
        resolved = _resolve_path(name, base)
        if isinstance(m, dict):
            m["name_or_path"] = resolved
        else:
            data["model"] = resolved
    par = data.get("parallel")
    if isinstance(par, dict) and isinstance(par.get("rank_table_file"), str):
        par["rank_table_file"] = _resolve_path(par["rank_table_file"], base)
    meth = data.get("method")
    if isinstance(meth, dict) and isinstance(meth.get("init_adapter"), str):
        meth["init_adapter"] = _resolve_path(meth["init_adapter"], base)
    ev = data.get("eval")
    if isinstance(ev, dict) and isinstance(ev.get("prompts"), str):
        ev["prompts"] = _resolve_path(ev["prompts"], base)


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: list[str] | None = None,
    backend: str | None = None,
    plugins: Plugins | None = None,
) -> RunConfig:
    """Read, override, resolve and validate a job spec. Raises ConfigError listing everything."""
    plugins = plugins or get_plugins()
    cfg_path = Path(path).resolve() if path else None
    data = read_yaml(cfg_path) if cfg_path else {}
    problems = apply_overrides(data, list(overrides or []))
    if backend:
        data["backend"] = backend
    problems += launcher_world(data)
    base = cfg_path.parent if cfg_path else Path.cwd()
    resolve_paths(data, base)
    if data.get("output_dir") is None and cfg_path is not None:
        data["output_dir"] = str(Path.cwd() / "runs" / f"{cfg_path.parent.name}-{cfg_path.stem}")
    elif isinstance(data.get("output_dir"), str):
        data["output_dir"] = _resolve_path(data["output_dir"], Path.cwd())

    names = set(plugins.backends) | set(KNOWN_BACKENDS)
    sections = {k: data.pop(k) for k in list(data) if k in names}
    for name, section in sections.items():
        if section is not None and not isinstance(section, dict):
            problems.append(Problem(name, "backend section must be a mapping"))
    data["backend_options"] = {k: v or {} for k, v in sections.items() if isinstance(v or {}, dict)}

    config = None
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        problems += pydantic_problems(exc)
        problems += raw_backend_problems(data, plugins)
    if config is not None:
        problems += semantic_problems(config, plugins)
    if problems:
        raise ConfigError(problems, str(cfg_path) if cfg_path else "")
    assert config is not None
    return config


def launcher_world(data: dict[str, Any]) -> list[Problem]:
    """Inside processes started by torchrun (`torchrun --nproc_per_node 8 -m sft run -c ...`),
    the launcher's world is the job's: `parallel.nproc_per_node` / `nnodes` / `node_rank` come
    from its environment unless the config sets them, and must agree when it does."""
    env = os.environ
    if "LOCAL_WORLD_SIZE" not in env or "WORLD_SIZE" not in env:
        return []
    local, world = int(env["LOCAL_WORLD_SIZE"]), int(env["WORLD_SIZE"])
    launched = {
        "nproc_per_node": local,
        "nnodes": max(1, world // max(local, 1)),
        "node_rank": int(env.get("GROUP_RANK", "0")),
    }
    par = data.setdefault("parallel", {})
    if not isinstance(par, dict):
        return []
    problems = []
    for key, value in launched.items():
        given = par.setdefault(key, value)
        if given != value:
            problems.append(
                Problem(
                    f"parallel.{key}",
                    f"is {given!r} but the launcher (torchrun) started this process with "
                    f"{key}={value}",
                    f"remove parallel.{key} from the config, or launch with {key}={given}",
                )
            )
    return problems


def backend_options(config: RunConfig, plugins: Plugins) -> BaseModel:
    """The chosen backend's section validated by its Options model."""
    be = plugins.backends.get(config.backend)
    return be.Options.model_validate(config.options)


def semantic_problems(config: RunConfig, plugins: Plugins) -> list[Problem]:
    """Checks that need the registries: backend, capabilities, names, files."""
    problems: list[Problem] = []
    d = config.data
    for key, srcs in (("data.train", d.train), ("data.eval", d.eval or [])):
        for i, src in enumerate(srcs):
            where = f"{key}[{i}]" if len(srcs) > 1 else key
            problems += source_problems(src, where)
            if src.format != "auto" and src.format not in plugins.formats:
                guess = did_you_mean(src.format, plugins.formats)
                problems.append(
                    Problem(
                        f"{where}.format",
                        f"unknown format {src.format!r}",
                        (f"did you mean {guess!r}? " if guess else "")
                        + f"allowed: auto, {', '.join(plugins.formats)}",
                    )
                )
    tpl = d.template
    if tpl != "auto" and tpl not in plugins.templates and not os.path.isfile(tpl):
        guess = did_you_mean(tpl, plugins.templates)
        problems.append(
            Problem(
                "data.template",
                f"{tpl!r} is neither a built-in template nor a file",
                (f"did you mean {guess!r}? " if guess else "")
                + f"built-ins: auto, {', '.join(plugins.templates)}",
            )
        )
    if config.eval.prompts and not os.path.isfile(config.eval.prompts):
        problems.append(Problem("eval.prompts", f"file not found: {config.eval.prompts}"))
    problems += _writable_dir_problems("output_dir", config.output_dir)
    problems += _writable_dir_problems("data.cache_dir", d.cache_dir)
    for fmt in config.export.formats:
        if fmt not in plugins.exporters:
            guess = did_you_mean(fmt, plugins.exporters)
            problems.append(
                Problem(
                    "export.formats",
                    f"unknown export format {fmt!r}",
                    (f"did you mean {guess!r}? " if guess else "")
                    + f"installed: {', '.join(plugins.exporters)}",
                )
            )
    problems += export_problems(config)
    problems += init_adapter_problems(config)
    problems += trackers.problems(config, plugins)
    problems += backend_problems(config, plugins)
    for extra in plugins.hook.sft_validate_config(config=config):
        problems += _as_problems(extra or [])
    return problems


def source_problems(src: DataSource, where: str) -> list[Problem]:
    """A data source names something readable, and split/subset/revision only where they mean
    something (dataset repos; revision: hub ids)."""
    hub = looks_like_hub_id(src.path)
    if not (hub or os.path.exists(src.path) or glob.glob(src.path)):
        return [Problem(f"{where}.path", f"no file or directory matches {src.path}")]
    problems = []
    repo = is_dataset_repo(src)
    if repo and importlib.util.find_spec("datasets") is None:
        problems.append(
            Problem(
                f"{where}.path",
                f"{src.path} is a dataset repo, read with the `datasets` library, which is not "
                "installed here",
                f"install it with: {DATASETS_INSTALL}",
            )
        )
    for key in ("split", "subset"):
        if getattr(src, key) is not None and not repo:
            problems.append(
                Problem(
                    f"{where}.{key}",
                    f"applies to dataset repos (a hub id or a directory with a dataset card), "
                    f"not to {src.path}",
                    f"remove {key}",
                )
            )
    if src.revision is not None and not hub:
        problems.append(
            Problem(
                f"{where}.revision",
                f"applies to hub dataset ids; {src.path} is local",
                "remove revision (a local directory is read as it is)",
            )
        )
    return problems


def export_problems(config: RunConfig) -> list[Problem]:
    """`export.formats` / `export.dtype` combinations no exporter can honour."""
    ex, problems = config.export, []
    if ex.dtype.startswith("q") and "gguf" not in ex.formats:
        problems.append(
            Problem(
                "export.dtype",
                f"{ex.dtype} is a GGUF quantization, and export.formats has no gguf",
                "add gguf to export.formats, or use f32, f16 or bf16",
            )
        )
    if "adapter" in ex.formats and config.method.name not in ("lora", "qlora"):
        problems.append(
            Problem(
                "export.formats",
                f"adapter: method {config.method.name!r} trains no adapter",
                "export hf (the whole model) instead, or use method lora",
            )
        )
    if len(set(ex.formats)) != len(ex.formats):
        problems.append(Problem("export.formats", f"lists a format twice: {ex.formats}"))
    return problems


#: `method` fields and the `adapter_config.json` keys that must agree with `init_adapter`.
_ADAPTER_KEYS = {
    "r": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "use_dora": "use_dora",
    "use_rslora": "use_rslora",
    "target_modules": "target_modules",
    "modules_to_save": "modules_to_save",
}


def init_adapter_problems(config: RunConfig) -> list[Problem]:
    """`method.init_adapter` is a PEFT LoRA adapter directory, and the LoRA fields the config
    sets explicitly agree with it (the adapter's own values are the ones that train)."""
    m = config.method
    if m.name != "lora" or not m.init_adapter:
        return []
    cfg_file = Path(m.init_adapter) / "adapter_config.json"
    if not cfg_file.is_file():
        inner = Path(m.init_adapter) / "final" / "adapter"
        if not (inner / "adapter_config.json").is_file():
            inner = Path(m.init_adapter) / "adapter"
        hint = (
            f"its adapter is in {inner}: give that directory"
            if (inner / "adapter_config.json").is_file()
            else "give a directory written by `save_pretrained`, e.g. a LoRA run's final/adapter"
        )
        return [
            Problem(
                "method.init_adapter",
                f"{m.init_adapter} is not a PEFT adapter directory (no adapter_config.json)",
                hint,
            )
        ]
    try:
        adapter = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        return [Problem("method.init_adapter", f"cannot read {cfg_file}: {exc}")]
    if adapter.get("peft_type", "LORA") != "LORA":
        return [Problem("method.init_adapter", f"is a {adapter['peft_type']} adapter, not LoRA")]
    problems = []
    for field in sorted(m.model_fields_set & set(_ADAPTER_KEYS)):
        if _ADAPTER_KEYS[field] not in adapter:
            continue
        mine, theirs = getattr(m, field), adapter[_ADAPTER_KEYS[field]]
        if isinstance(mine, list) and isinstance(theirs, list):
            same = sorted(mine) == sorted(theirs)
        else:
            same = mine == theirs or (theirs is None and mine == [])
        if not same:
            problems.append(
                Problem(
                    f"method.{field}",
                    f"is {mine!r} but method.init_adapter was trained with {theirs!r}",
                    f"remove method.{field}: the adapter's own value is used",
                )
            )
    return problems


def _writable_dir_problems(key: str, path: str | None) -> list[Problem]:
    """A directory sft will create or write into: not a file, under a writable directory
    (checked here so a bad path is a config error, not a traceback mid-run)."""
    if not path:
        return []
    if "\0" in path:
        return [Problem(key, "contains a NUL byte")]
    p = Path(os.path.abspath(os.path.expanduser(path)))
    if os.path.exists(p) and not os.path.isdir(p):
        return [Problem(key, f"{p} is a file, not a directory", "choose another path")]
    existing = next((a for a in (p, *p.parents) if os.path.exists(a)), Path("/"))
    if not os.path.isdir(existing):
        return [Problem(key, f"cannot create {p}: {existing} is a file")]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [Problem(key, f"cannot write into {existing}", "choose a writable directory")]
    return []


def raw_backend_problems(data: dict[str, Any], plugins: Plugins) -> list[Problem]:
    """Backend and method checks on the raw mapping, so that they are reported together with
    schema errors elsewhere in the file (the full checks need a valid config)."""
    name = data.get("backend", RunConfig.model_fields["backend"].default)
    method = data.get("method", "lora")
    method = method.get("name") if isinstance(method, dict) else method
    if isinstance(name, str) and name not in plugins.backends:
        return _unknown_backend(name, plugins)
    if not isinstance(name, str) or method not in METHOD_NAMES:
        return []
    if method in plugins.backends.get(name).capabilities:
        return []
    have = [b for b, x in plugins.backends.items() if method in x.capabilities]
    return [
        Problem(
            "method.name",
            f"backend {name!r} does not support method {method!r}",
            f"backends that do: {', '.join(have)}" if have else "no installed backend does",
        )
    ]


def backend_problems(config: RunConfig, plugins: Plugins) -> list[Problem]:
    """The chosen backend exists, its section is valid, and it can do what the config asks."""
    name = config.backend
    if name not in plugins.backends:
        return _unknown_backend(name, plugins)
    be = plugins.backends.get(name)
    problems = []
    for other, section in config.backend_options.items():
        # the other installed backends' sections are checked too: a typo there must not wait
        # for the day the config runs on that backend
        if other != name and other in plugins.backends:
            try:
                plugins.backends.get(other).Options.model_validate(section)
            except ValidationError as exc:
                problems += pydantic_problems(
                    exc, prefix=other, model=plugins.backends.get(other).Options
                )
    return problems + _backend_checks(config, plugins, be)


def _unknown_backend(name: str, plugins: Plugins) -> list[Problem]:
    if name in KNOWN_BACKENDS:
        return [
            Problem(
                "backend",
                f"backend {name!r} is not installed",
                f"install it with: {KNOWN_BACKENDS[name]}",
            )
        ]
    guess = did_you_mean(name, set(plugins.backends) | set(KNOWN_BACKENDS))
    return [
        Problem(
            "backend",
            f"unknown backend {name!r}",
            (f"did you mean {guess!r}? " if guess else "")
            + f"installed: {', '.join(plugins.backends) or '(none)'}",
        )
    ]


def _as_problems(texts: list[str]) -> list[Problem]:
    problems = []
    for text in texts:
        path, _, msg = text.partition(": ")
        problems.append(Problem(path, msg) if msg else Problem("", text))
    return problems


def _honoured_by(path: str, config: RunConfig, plugins: Plugins) -> str:
    """ "backends that do: ..." for a field the chosen backend refused: every other installed
    backend whose own validation accepts the same config at that key."""
    if not path:
        return ""
    have = []
    for name, other in plugins.backends.items():
        if name == config.backend or not getattr(other, "trains", True):
            continue
        try:
            theirs = _as_problems(other.validate(config.model_copy(update={"backend": name})))
        except Exception:  # another backend's checks must never hide this one's message
            continue
        if not any(p.path == path or p.path.startswith(path + ".") for p in theirs):
            have.append(name)
    return f"backends that do: {', '.join(have)}" if have else ""


def _backend_checks(config: RunConfig, plugins: Plugins, be: Any) -> list[Problem]:
    name = config.backend
    problems: list[Problem] = []
    try:
        be.Options.model_validate(config.options)
    except ValidationError as exc:
        problems += pydantic_problems(exc, prefix=name, model=be.Options)
    caps = be.capabilities
    others = lambda cap: [b for b, x in plugins.backends.items() if cap in x.capabilities]  # noqa: E731
    wanted: list[tuple[str, str, str]] = [
        ("method.name", config.method.name, f"method {config.method.name!r}")
    ]
    par = config.parallel
    if par.world_size > 1 or par.strategy != "ddp":
        wanted.append(("parallel.strategy", par.strategy, f"strategy {par.strategy!r}"))
    if par.nnodes > 1:
        wanted.append(("parallel.nnodes", "multi_node", "more than one node"))
    for key, cap in (
        ("tensor_parallel", "tensor_parallel"),
        ("pipeline_parallel", "pipeline_parallel"),
        ("context_parallel", "context_parallel"),
    ):
        if getattr(par, key) > 1:
            wanted.append((f"parallel.{key}", cap, key.replace("_", " ")))
    if config.data.packing is True:
        wanted.append(("data.packing", "packing", "packing"))
    if par.rank_table_file:
        wanted.append(("parallel.rank_table_file", "rank_table", "a rank-table launch"))
    if config.eval.prompts and not callable(getattr(be, "evaluate", None)):
        wanted.append(("eval.prompts", "evaluate", "generation for eval.prompts"))
    own = [
        Problem(p.path, p.message, p.hint or _honoured_by(p.path, config, plugins))
        for p in _as_problems(be.validate(config))
    ]
    explained = {p.path for p in own}  # the backend's own message says more than the generic one
    for key, cap, what in wanted:
        supported = cap in caps if cap != "evaluate" else callable(getattr(be, "evaluate", None))
        if not supported and key not in explained:
            have = (
                others(cap)
                if cap != "evaluate"
                else [b for b, x in plugins.backends.items() if callable(getattr(x, "evaluate", 0))]
            )
            problems.append(
                Problem(
                    key,
                    f"backend {name!r} does not support {what}",
                    f"backends that do: {', '.join(have)}" if have else "no installed backend does",
                )
            )
    return problems + own
