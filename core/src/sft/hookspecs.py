"""All extension points of sft, in one file.

A plugin is a module (or object) with functions named like these hooks, decorated with
`sft.hookimpl`, exposed through the `sft` entry-point group:

    # pyproject.toml of a plugin
    [project.entry-points.sft]
    mybackend = "sft_mybackend.plugin"

Registration hooks receive a `register` callback so that core owns each registry and can report
duplicates and unknown names. "Who handles this" hooks are `firstresult`: the first non-None
answer wins. A plugin module must import in milliseconds: import frameworks inside functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from sft.backend import Backend
    from sft.specs import RunConfig

hookspec = pluggy.HookspecMarker("sft")
hookimpl = pluggy.HookimplMarker("sft")
"""Marks a plugin's hook implementations (public as `sft.hookimpl`)."""


@hookspec
def sft_register_backends(register: Callable[[Backend], None]) -> None:
    """Register training backends: `register(backend)` with an object that satisfies
    `sft.backend.Backend`. Its module must not import the framework; `train()` does."""


@hookspec
def sft_register_dataset_formats(register: Callable[..., None]) -> None:
    """Register record formats: `register(name, converter, detect=None)`, where
    `converter(record: dict, mapping) -> sft.data.conversation.Conversation` raises
    `sft.data.conversation.RecordError` for a bad record, and `detect(record) -> bool` says
    whether a record looks like this format (used by `format: auto`)."""


@hookspec
def sft_register_chat_templates(register: Callable[..., None]) -> None:
    """Register built-in chat templates: `register(name, jinja_source, stop="...")`, for models
    whose tokenizer has none. `stop` is the template's end-of-turn text."""


@hookspec
def sft_register_exporters(register: Callable[..., None]) -> None:
    """Register export formats: `register(name, export_fn, description="")` where
    `export_fn(run: sft.export.ExportRequest) -> sft.export.ExportReport` writes the export,
    verifies it and reports what it checked."""


@hookspec
def sft_register_trackers(register: Callable[..., None]) -> None:
    """Register experiment trackers: `register(name, description="")`. `logging.trackers`
    accepts the registered names; the tracker then records a run through the lifecycle hooks
    below when `name in sft.trackers.enabled(config)`."""


@hookspec
def sft_register_commands(cli: Any) -> None:
    """Add subcommands to the `sft` CLI (`cli` is the root `typer.Typer`)."""


@hookspec(firstresult=True)
def sft_write_data(fmt: str, data: Any, out_dir: str, config: RunConfig) -> str | None:
    """Write a prepared dataset (`sft.data.cache.PreparedData`) in a backend's own format
    (e.g. `mindrecord`) into `out_dir`; return the path written, or None if `fmt` is not yours.
    Used by `sft data prepare --format FMT`. Stops at the first non-None result."""


@hookspec(firstresult=True)
def sft_resolve_model(spec: str, cache_dir: str, revision: str | None) -> str | None:
    """Turn a model spec (built-in name, `.gguf` file, hub id) into a local Hugging Face model
    directory (config.json, safetensors, tokenizer). `revision` is `model.revision` (a hub
    branch, tag or commit; None for the default). Return None if not yours. Stops at the
    first non-None result. Local HF directories are handled by core before this hook runs."""


@hookspec
def sft_validate_config(config: RunConfig) -> list[str] | None:
    """Return extra problems with a validated config as `"key.path: message"` strings; they are
    merged with core's into one error."""


@hookspec
def sft_train_start(config: RunConfig, run_dir: str, info: dict[str, Any]) -> None:
    """Called on the main process when training starts (after data and model are ready)."""


@hookspec
def sft_log_metrics(step: int, metrics: dict[str, float], run_dir: str) -> None:
    """Called on the main process for each logged step with its metrics (`loss`, `lr`,
    `grad_norm`, `tokens_per_s`, `eval_loss`, ...)."""


@hookspec
def sft_train_end(config: RunConfig, run_dir: str, summary: dict[str, Any]) -> None:
    """Called on the main process when training ends, with the contents of `summary.json`."""
