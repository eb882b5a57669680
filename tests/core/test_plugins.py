"""Plugins: registries owned by core, entry-point discovery, and no framework at import time."""

from __future__ import annotations

import os
import subprocess
import sys

import pluggy
import pytest
from sft.errors import SftError, UnknownNameError
from sft.hookspecs import hookimpl
from sft.plugins import Plugins, Registry


def test_registry_duplicate_and_unknown_names() -> None:
    reg: Registry[int] = Registry("backend")
    reg.register("torch", 1)
    with pytest.raises(SftError, match="registered twice"):
        reg.register("torch", 2)
    with pytest.raises(UnknownNameError) as info:
        reg.get("trch")
    assert "did you mean 'torch'?" in str(info.value) and "installed: torch" in str(info.value)


def test_misspelled_hook_is_an_error() -> None:
    class Bad:
        @hookimpl
        def sft_register_backend(self, register):  # missing 's'
            pass

    with pytest.raises(pluggy.PluginValidationError):
        Plugins(autoload=False, extra=(Bad(),))


def test_extra_plugin_registers_a_backend() -> None:
    from sft_example.plugin import ExampleBackend

    class Mine(ExampleBackend):
        name = "mine"

    class P:
        @hookimpl
        def sft_register_backends(self, register):
            register(Mine())

    plugins = Plugins(autoload=False, extra=(P(),))
    assert list(plugins.backends) == ["mine"]


def test_entry_points_load_example_backend_unless_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "example" in Plugins(autoload=True).backends
    monkeypatch.setenv("SFT_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "example" not in Plugins().backends


def test_builtin_registries_are_filled() -> None:
    plugins = Plugins(autoload=False)
    assert {"alpaca", "sharegpt", "messages"} <= set(plugins.formats)
    assert {"chatml", "llama3"} <= set(plugins.templates)


CHECK = """
import sys
import sft, sft.cli, sft.config, sft.run, sft.data.batching
from sft.plugins import get_plugins
p = get_plugins()
sft.cli._command()
heavy = sorted(m for m in ("torch", "mindspore", "mindformers", "peft", "tensorflow") if m in sys.modules)
print("backends:", ",".join(p.backends))
print("heavy:", ",".join(heavy))
"""


def test_core_and_plugins_import_no_framework() -> None:
    env = {**os.environ, "SFT_DISABLE_PLUGIN_AUTOLOAD": ""}
    out = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert "heavy: \n" in out, out
    assert "example" in out


def test_sft_backends_lists_missing_ones_with_install_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sft", "backends"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    assert "example" in out and "ready" in out
    for name in ("torch", "mindspore"):
        assert name in out
    if os.environ.get("SFT_TEST_ENV") == "core":
        assert "not installed" in out and "pip install -e backends/torch" in out
