"""Model resolution in core: local directories, and built-ins converted once by the torch
environment and then found by any environment that shares the cache (e.g. MindSpore's)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sft.errors import SftError
from sft.models import resolve_model
from sft.paths import cache_root
from sft.plugins import reset_plugins


def test_local_directory(tiny_llama: Path) -> None:
    m = resolve_model(str(tiny_llama))
    assert m.path == tiny_llama.resolve() and m.model_type == "llama"


def test_builtin_found_in_shared_cache_without_a_converter(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SFT_DISABLE_PLUGIN_AUTOLOAD", "1")  # no torch hook: as in the MindSpore env
    reset_plugins()
    with pytest.raises(SftError, match="sft models prepare smollm2-135m-instruct"):
        resolve_model("smollm2-135m-instruct")
    target = cache_root() / "models" / "smollm2-135m-instruct-0123456789abcdef-float32"
    shutil.copytree(tiny_llama, target)
    assert resolve_model("smollm2-135m-instruct").path == target
