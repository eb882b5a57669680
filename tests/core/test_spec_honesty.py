"""Fields that validate must do something: the checks core makes for every backend (export,
revision, overrides under shorthands, torchrun's world size, backends that honour a refused
field), and the MindSpore backend's device detection. No framework needed.

    $ .venvs/core/bin/python -m pytest tests/core/test_spec_honesty.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from sft.config import load_config
from sft.errors import ConfigError

from tests.tiny import make_model


def job(tmp_path: Path, **extra: object) -> Path:
    (tmp_path / "train.jsonl").write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            }
        )
        + "\n"
    )
    data = {"backend": "example", "data": {"train": "train.jsonl"}, **extra}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def problems(path: Path, overrides: list[str] | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides or [])
    return {p.path: str(p) for p in info.value.problems}


def test_revision_is_for_hub_ids_only(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    found = problems(job(tmp_path, model={"name_or_path": str(model), "revision": "v1"}))
    assert "model.revision" in found and "local path" in found["model.revision"]
    found = problems(
        job(tmp_path, model={"name_or_path": "smollm2-135m-instruct", "revision": "x"})
    )
    assert "not a hub id" in found["model.revision"]
    cfg = load_config(job(tmp_path, model={"name_or_path": "org/model", "revision": "v1.0"}))
    assert cfg.model.revision == "v1.0"


def test_quantized_dtype_needs_gguf_and_adapter_needs_lora(tmp_path: Path) -> None:
    found = problems(job(tmp_path, export={"formats": [], "dtype": "q8_0"}))
    assert "export.dtype" in found and "gguf" in found["export.dtype"]
    found = problems(job(tmp_path, method="full", export={"formats": ["adapter"]}))
    assert "trains no adapter" in found["export.formats"]


def test_override_under_the_model_shorthand(tmp_path: Path) -> None:
    path = job(tmp_path, model="smollm2-135m-instruct")
    cfg = load_config(path, ["model.dtype=bfloat16", "method.r=8"])
    assert cfg.model.name_or_path == "smollm2-135m-instruct" and cfg.model.dtype == "bfloat16"
    cfg = load_config(job(tmp_path, method="lora"), ["method.r=4"])
    assert cfg.method.name == "lora" and cfg.method.r == 4


def test_torchrun_world_size_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = load_config(job(tmp_path))
    par = cfg.parallel
    assert (par.nproc_per_node, par.nnodes, par.node_rank) == (2, 1, 0)
    found = problems(job(tmp_path, parallel={"nproc_per_node": 8}))
    assert "torchrun" in found["parallel.nproc_per_node"]


def test_eval_prompts_refused_without_generation(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi", "contains": ["yo"]}\n')
    found = problems(job(tmp_path, eval={"prompts": "p.jsonl"}))
    assert "eval.prompts" in found and "backend 'example' does not support" in found["eval.prompts"]


def test_other_installed_backend_sections_are_checked(tmp_path: Path) -> None:
    from sft.plugins import get_plugins

    others = [b for b in get_plugins().backends if b != "example"]
    if not others:
        pytest.skip("only the example backend is installed here")
    found = problems(job(tmp_path, **{others[0]: {"no_such_option": 1}}))
    assert f"{others[0]}.no_such_option" in found
