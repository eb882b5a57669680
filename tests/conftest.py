"""Shared fixtures: tiny local models and tokenizers (never downloaded), isolated plugins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny import make_model, make_tokenizer


@pytest.fixture(autouse=True)
def _isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Data caches and converted models of a test never leak into ~/.cache or other tests.
    monkeypatch.setenv("SFT_CACHE_DIR", str(tmp_path_factory.mktemp("sft-cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _fresh_plugins():
    from sft.plugins import reset_plugins

    reset_plugins()
    yield
    reset_plugins()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2")


ENV = os.environ.get("SFT_TEST_ENV", "")


def pytest_report_header() -> str:
    from tests.fuzz import SEED

    return f"fuzz seed: {SEED} (SFT_FUZZ_SEED={SEED} replays the fresh-seed fuzz examples)"
