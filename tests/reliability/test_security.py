"""Security defaults that can be checked on a CPU: configs never run or import code, pickle
weights need an explicit flag, chat templates run sandboxed, model code shipped with a
checkpoint never runs unless `model.trust_remote_code` is set, hostile paths are problems.

    $ .venvs/torch/bin/python -m pytest tests/reliability/test_security.py -q
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from sft.config import load_config
from sft.errors import ConfigError, SftError

MSG = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def write_job(d: Path, spec: dict | str) -> Path:
    (d / "train.jsonl").write_text(json.dumps(MSG) + "\n")
    path = d / "job.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    "payload",
    [
        "backend: !!python/object/apply:os.system ['touch {marker}']",
        "data: !!python/object/new:subprocess.Popen [['touch', '{marker}']]",
        "model: !!python/name:os.system",
    ],
)
def test_yaml_tags_never_run_code(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "PWNED"
    cfg = write_job(tmp_path, "data: {train: train.jsonl}\n" + payload.format(marker=marker))
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(cfg)
    assert not marker.exists()


def test_configs_name_registry_entries_never_import_paths(tmp_path: Path) -> None:
    # Every place a config names a component takes a registry name (or a data file), so a
    # dotted path is an unknown name and nothing gets imported.
    before = set(sys.modules)
    spec = {
        "backend": "example",
        "data": {"train": {"path": "train.jsonl", "format": "os.system"}, "template": "os:popen"},
        "export": {"formats": ["subprocess.Popen"]},
    }
    with pytest.raises(ConfigError) as info:
        load_config(write_job(tmp_path, spec))
    paths = {p.path for p in info.value.problems}
    assert {"data.train.format", "data.template", "export.formats"} <= paths, str(info.value)
    assert not {"subprocess", "os.system"} & (set(sys.modules) - before)
    with pytest.raises(ConfigError, match=r"unknown backend 'os\.path'"):
        load_config(write_job(tmp_path, {"backend": "os.path", "data": {"train": "train.jsonl"}}))


def pickle_only_model(d: Path, tiny_llama: Path) -> Path:
    model = d / "pickled"
    model.mkdir()
    shutil.copy(tiny_llama / "config.json", model / "config.json")
    (model / "pytorch_model.bin").write_bytes(b"not loaded by the check")
    return model


def test_pickle_weights_need_allow_pickle(tmp_path: Path, tiny_llama: Path) -> None:
    model = pickle_only_model(tmp_path, tiny_llama)
    spec = {"backend": "example", "model": str(model), "data": {"train": "train.jsonl"}}
    with pytest.raises(ConfigError, match=r"only pickle-based weights \(pytorch_model.bin\)"):
        load_config(write_job(tmp_path, spec))
    spec["model"] = {"name_or_path": str(model), "allow_pickle": True}
    assert load_config(write_job(tmp_path, spec)).model.allow_pickle
    spec["model"] = str(tiny_llama)  # safetensors: fine by default
    assert load_config(write_job(tmp_path, spec)).model.name_or_path == str(tiny_llama)


def test_hostile_model_paths_are_problems_not_crashes(tmp_path: Path) -> None:
    for name, needle in [
        ("./m\0.gguf", "NUL byte"),
        ("x" * 300 + ".gguf", "GGUF file not found"),
        ("/nonexistent/" + "y" * 300, "no such file"),
    ]:
        spec = {
            "backend": "example",
            "model": {"name_or_path": name},
            "data": {"train": "train.jsonl"},
        }
        with pytest.raises(ConfigError, match=needle):
            load_config(write_job(tmp_path, spec))


def test_chat_templates_run_sandboxed(tmp_path: Path, tiny_tokenizer: Path) -> None:
    # A template file is data, not code: Jinja's sandbox refuses the classic escape.
    from sft.data.pipeline import prepare_data

    marker = tmp_path / "PWNED"
    evil = (
        "{% for m in messages %}{{ m.content }}{% endfor %}"
        "{{ ''.__class__.__mro__[1].__subclasses__() }}"
        "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
    )
    (tmp_path / "evil.jinja").write_text(evil)
    cfg = load_config(
        write_job(
            tmp_path,
            {
                "backend": "example",
                "data": {
                    "train": "train.jsonl",
                    "template": "./evil.jinja",
                    "cache_dir": str(tmp_path / "c"),
                },
            },
        )
    )
    with pytest.raises(SftError, match="SecurityError: access to attribute '__class__'"):
        prepare_data(cfg, SimpleNamespace(path=tiny_tokenizer))
    assert not marker.exists()


REMOTE_CODE = """
from pathlib import Path
Path(__file__).with_name("REMOTE_CODE_RAN").write_text("yes")
from transformers import LlamaConfig
class EvilConfig(LlamaConfig):
    model_type = "evil-llama"
"""


@pytest.mark.torch
def test_model_code_shipped_with_a_checkpoint_does_not_run_by_default(
    tmp_path: Path, tiny_llama: Path
) -> None:
    pytest.importorskip("torch")
    from sft_torch.model import load_model
    from sft_torch.options import TorchOptions

    model = tmp_path / "remote"
    shutil.copytree(tiny_llama, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update({"model_type": "evil-llama", "auto_map": {"AutoConfig": "evil.EvilConfig"}})
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "evil.py").write_text(REMOTE_CODE)
    spec = {
        "backend": "torch",
        "model": str(model),
        "data": {"train": "train.jsonl"},
        "torch": {"device": "cpu"},
    }
    config = load_config(write_job(tmp_path, spec))
    assert config.model.trust_remote_code is False
    plan = SimpleNamespace(
        config=config,
        options=TorchOptions.model_validate(config.options),
        model=SimpleNamespace(path=model),
    )
    import torch

    with pytest.raises(SftError, match="trust_remote_code"):
        load_model(plan, torch.device("cpu"))
    assert not list(tmp_path.rglob("REMOTE_CODE_RAN")), "model code ran without trust_remote_code"


def test_output_and_cache_dirs_that_cannot_be_directories_are_config_errors(
    tmp_path: Path,
) -> None:
    # Before: a traceback from mkdir when training started.
    (tmp_path / "afile").write_text("x")
    for key, value, needle in [
        ("output_dir", str(tmp_path / "afile"), "is a file, not a directory"),
        ("output_dir", str(tmp_path / "afile" / "sub"), "afile is a file"),
        ("cache_dir", str(tmp_path / "afile" / "c"), "afile is a file"),
    ]:
        spec: dict = {"backend": "example", "data": {"train": "train.jsonl"}}
        if key == "cache_dir":
            spec["data"]["cache_dir"] = value
        else:
            spec[key] = value
        with pytest.raises(ConfigError, match=needle):
            load_config(write_job(tmp_path, spec))
