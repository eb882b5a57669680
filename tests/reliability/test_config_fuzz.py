"""Hostile configs: generated YAML files and overrides through `load_config` must give a valid
RunConfig or one clear `SftError` (ConfigError for config mistakes) - never another exception.

Core only (no torch), so it runs in every venv:

    $ .venvs/core/bin/python -m pytest tests/reliability/test_config_fuzz.py -q

Three generators, 1000+ examples in all: mutations of a valid config (a known or invented key set
to a hostile value), raw YAML text (broken syntax, python tags, invalid UTF-8, deep nesting), and
`key=value` overrides.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from sft.config import load_config
from sft.errors import SftError
from sft.specs import RunConfig

from tests.fuzz import fuzz

FUZZ = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

BASE: dict[str, Any] = {"backend": "example", "data": {"train": "train.jsonl"}}

# Every documented key path of the spec, so mutations hit real fields as well as invented ones.
SECTIONS = [
    "model",
    "data",
    "method",
    "train",
    "parallel",
    "checkpoint",
    "eval",
    "export",
    "logging",
]
KNOWN = sorted(
    {
        f"{s}.{f}"
        for s in SECTIONS
        for f in getattr(RunConfig.model_fields[s].annotation, "model_fields", {})
    }
    | {
        "method.r",
        "method.alpha",
        "method.target_modules",
        "method.bits",
        "method.name",
        "backend",
        "output_dir",
        "data",
        "model",
        "method",
        "torch.device",
        "example.foo",
    }
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(
        [
            "auto",
            "lora",
            "full",
            "qlora",
            "cosine",
            "",
            "~",
            "../../etc/passwd",
            "/nonexistent/model.gguf",
            "a\x00b",
            "x" * 5000,
            "1e400",
            "-0",
            "null",
            "smollm2-135m-instruct",
            "!!python/object/apply:os.system",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
key_paths = st.one_of(
    st.sampled_from(KNOWN),
    st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=4).map(".".join),
)


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    node: Any = data
    parts = path.split(".")
    for part in parts[:-1]:
        if not isinstance(node, dict):
            return
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if isinstance(node, dict):
        node[parts[-1]] = value


def _must_be_clear(path: Path, overrides: list[str] | None = None) -> None:
    """The contract: a RunConfig or an SftError with a message; anything else propagates as a
    test failure (hypothesis then shrinks it to the smallest config that crashes)."""
    try:
        cfg = load_config(path, overrides or [])
    except SftError as exc:
        text = str(exc)
        assert text.strip(), "an SftError must say what is wrong"
        assert "Traceback" not in text
        return
    assert isinstance(cfg, RunConfig)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cfgfuzz")
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    (d / "train.jsonl").write_text(json.dumps(rec) + "\n")
    return d


def test_the_base_config_is_valid(workdir: Path) -> None:
    # Otherwise every mutation below would fail for the same boring reason.
    path = workdir / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert load_config(path).backend == "example"


@fuzz(FUZZ, 100, edits=st.lists(st.tuples(key_paths, values), min_size=1, max_size=4))
def test_mutated_configs_fail_clearly(workdir: Path, edits: list[tuple[str, Any]]) -> None:
    data = copy.deepcopy(BASE)
    for path, value in edits:
        _set(data, path, value)
    cfg = workdir / "mutated.yaml"
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        return  # not representable as YAML (e.g. a lone surrogate): no file a user could write
    cfg.write_text(text, encoding="utf-8", errors="surrogatepass")
    _must_be_clear(cfg)


test_mutated_configs_fail_clearly_fresh_seed = test_mutated_configs_fail_clearly.fresh_seed


HOSTILE_YAML = [
    "!!python/object/apply:os.system ['touch PWNED']",
    "train: !!python/object/apply:os.system ['touch PWNED']\n",
    "data: {train: train.jsonl}\nbackend: !!python/name:os.system\n",
    "data:\n  train: [train.jsonl\n",
    "data: {train: train.jsonl}\n\tbackend: example\n",
    "- just\n- a\n- list\n",
    "42",
    "data: {train: train.jsonl}\nbackend: example\nbackend: torch\n",
    "a: &a [1, 2]\nb: *a\ndata: {train: *a}\n",
    "data: " + "[" * 200 + "]" * 200 + "\n",
    "data: " + "{a: " * 200 + "1" + "}" * 200 + "\n",
    "data: {train: train.jsonl}\nmodel: " + "x" * 100_000 + "\n",
    "data: {train: train.jsonl}\nbackend: example\nmodel: " + "x" * 300 + "\n",  # > NAME_MAX
    "data: {train: train.jsonl}\nbackend: example\nmodel: " + "x" * 300 + ".gguf\n",
    "data: {train: " + "y" * 300 + ".jsonl}\nbackend: example\n",
    "data: {train: train.jsonl, template: " + "z" * 300 + ".jinja}\nbackend: example\n",
    "data: {train: train.jsonl}\nbackend: example\neval: {prompts: " + "p" * 300 + "}\n",
    'data: {train: train.jsonl}\nbackend: example\nmodel: "a\\0b"\n',
    'data: {train: "./tr\\0ain.jsonl", template: "./t\\0.jinja"}\nbackend: example\n',
    'data: {train: train.jsonl}\nbackend: example\nmodel: "./m\\0.gguf"\n',
    "\ufeffdata: {train: train.jsonl}\nbackend: example\n",
    "%YAML 9.9\n---\ndata: {}\n",
    "data: {train: train.jsonl}\n---\nbackend: example\n",
]


@fuzz(
    FUZZ,
    100,
    text=st.one_of(st.sampled_from(HOSTILE_YAML), st.text(max_size=200)),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=300)),
    junk=st.binary(max_size=8),
)
def test_raw_yaml_fails_clearly(workdir: Path, text: str, cut: int | None, junk: bytes) -> None:
    cfg = workdir / "raw.yaml"
    raw = text.encode("utf-8", errors="surrogatepass")
    cfg.write_bytes(raw if cut is None else raw[:cut] + junk)  # whole, or truncated + bytes
    _must_be_clear(cfg)
    assert not (workdir / "PWNED").exists(), "a config must never run code"


test_raw_yaml_fails_clearly_fresh_seed = test_raw_yaml_fails_clearly.fresh_seed


override_items = st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, v: f"{k}={v}", key_paths, st.text(max_size=30)),
    st.builds(lambda k, v: f"{k}={json.dumps(v)}", key_paths, values),
    st.sampled_from(
        [
            "=",
            "==",
            "train=1",
            "train.lr",
            ".=1",
            "data.train.=x",
            "a..b=1",
            "backend=!!python/name:os.system",
            "data.train=" + "[" * 100,
        ]
    ),
)


@fuzz(FUZZ, 100, overrides=st.lists(override_items, max_size=4))
def test_overrides_fail_clearly(workdir: Path, overrides: list[str]) -> None:
    cfg = workdir / "ovr.yaml"
    cfg.write_text(yaml.safe_dump(BASE))
    _must_be_clear(cfg, overrides)


test_overrides_fail_clearly_fresh_seed = test_overrides_fail_clearly.fresh_seed


def test_deep_yaml_nesting_is_a_clear_error(workdir: Path) -> None:
    # Deep enough to blow Python's recursion limit in a naive loader.
    cfg = workdir / "deep.yaml"
    cfg.write_text("data: " + "[" * 5000 + "]" * 5000 + "\n")
    _must_be_clear(cfg)


def test_invalid_utf8_config_names_the_file(workdir: Path) -> None:
    cfg = workdir / "latin1.yaml"
    cfg.write_bytes("data: {train: caf\xe9.jsonl}\n".encode("latin-1"))
    with pytest.raises(SftError, match=r"latin1\.yaml"):
        load_config(cfg)


def test_the_cli_reports_every_hostile_config_without_a_traceback(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # What a user actually runs: `sft config validate` returns 2 (config) or 1 (other error)
    # with one message, never a traceback.
    from sft.cli import main

    cfg = workdir / "cli.yaml"
    for text in HOSTILE_YAML:
        cfg.write_text(text, encoding="utf-8")
        code = main(["config", "validate", "--config", str(cfg)])
        err = capsys.readouterr().err
        assert code in (0, 1, 2), (text[:80], code, err)
        assert "Traceback" not in err and (code == 0 or err.startswith("error: ")), err
