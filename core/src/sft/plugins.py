"""The plugin manager and the registries it fills.

Built-in plugins (core's own formats, templates, exporters) are registered first, then every
module of the `sft` entry-point group (unless `SFT_DISABLE_PLUGIN_AUTOLOAD=1`). Unknown hook
implementations are errors (`check_pending`). Registries are filled once, on first use.

    $ sft plugins      # what is loaded and which hooks each implements
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pluggy

from sft import hookspecs
from sft.errors import SftError, UnknownNameError

ENTRY_POINT_GROUP = "sft"
BUILTIN_PLUGINS = ("sft.data.formats", "sft.data.templates", "sft.models")

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object, filled through a `register` callback; duplicates and unknowns raise."""

    def __init__(self, kind: str, hint: str = "") -> None:
        self.kind, self.hint = kind, hint
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> None:
        if name in self._items:
            raise SftError(f"{self.kind} {name!r} is registered twice (by two plugins?)")
        self._items[name] = item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._items, self.hint) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())


@dataclass(frozen=True)
class Exporter:
    name: str
    fn: Callable[..., Any]
    description: str = ""


@dataclass(frozen=True)
class DatasetFormat:
    name: str
    convert: Callable[..., Any]
    detect: Callable[[dict[str, Any]], bool] | None = None


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str
    stop: str = ""


class Plugins:
    """The loaded plugins and the registries they filled."""

    def __init__(self, autoload: bool | None = None, extra: tuple[object, ...] = ()) -> None:
        if autoload is None:
            autoload = os.environ.get("SFT_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
        pm = pluggy.PluginManager("sft")
        pm.add_hookspecs(hookspecs)
        for name in BUILTIN_PLUGINS:
            pm.register(__import__(name, fromlist=["_"]), name=name)
        if autoload:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for plugin in extra:
            pm.register(plugin)
        pm.check_pending()
        self.pm = pm
        self.hook = pm.hook

        from sft.backend import Backend

        self.backends: Registry[Backend] = Registry(
            "backend", "See `sft backends` for install commands"
        )
        self.formats: Registry[DatasetFormat] = Registry("dataset format")
        self.templates: Registry[ChatTemplate] = Registry(
            "chat template", "Or give a path to a .jinja file"
        )
        self.exporters: Registry[Exporter] = Registry("export format")
        self.trackers: Registry[str] = Registry("experiment tracker")
        self.hook.sft_register_backends(register=lambda b: self.backends.register(b.name, b))
        self.hook.sft_register_dataset_formats(
            register=lambda name, convert, detect=None: self.formats.register(
                name, DatasetFormat(name, convert, detect)
            )
        )
        self.hook.sft_register_chat_templates(
            register=lambda name, source, stop="": self.templates.register(
                name, ChatTemplate(name, source, stop)
            )
        )
        self.hook.sft_register_exporters(
            register=lambda name, fn, description="": self.exporters.register(
                name, Exporter(name, fn, description)
            )
        )

        self.hook.sft_register_trackers(
            register=lambda name, description="": self.trackers.register(name, description)
        )

    def plugin_table(self) -> list[tuple[str, str, list[str]]]:
        """(name, module or dist, hooks) for every loaded plugin."""
        dists = {id(p): f"{d.project_name} {d.version}" for p, d in self.pm.list_plugin_distinfo()}
        rows = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            rows.append((name, dists.get(id(plugin), "built-in"), hooks))
        return rows


@functools.lru_cache(maxsize=1)
def get_plugins() -> Plugins:
    """The process-wide plugins, loaded on first use."""
    return Plugins()


def reset_plugins() -> None:
    """Forget the loaded plugins (tests register their own)."""
    get_plugins.cache_clear()
