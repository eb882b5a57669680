"""Every YAML under configs/ is a fixture: it must validate with the backend it names."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from sft.config import load_config
from sft.plugins import get_plugins

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "data" not in p.parts)


def test_configs_exist() -> None:
    assert CONFIGS, "configs/ holds no job specs"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_shipped_config_validates(path: Path) -> None:
    text = path.read_text()
    assert text.lstrip().startswith("#"), f"{path} must open with a comment saying how to run it"
    backend = (yaml.safe_load(text) or {}).get("backend", "torch")
    if backend not in get_plugins().backends:
        pytest.skip(f"backend {backend!r} is not installed in this environment")
    cfg = load_config(path)
    assert cfg.backend == backend
