"""The MindSpore column of the architecture matrix (`sft.archs`) is what the backend does: the
model types MindFormers' legacy LlamaForCausalLM takes are marked verified, every other one is
refused at validation (before any weight is converted) with the supported list.

    $ SFT_TEST_ENV=mindspore .venvs/ms/bin/python -m pytest tests/backends/mindspore/test_archs_refused.py
"""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("mindspore")

from sft.archs import ARCHITECTURES, VERIFIED
from sft.config import load_config
from sft.errors import ConfigError
from sft_mindspore.weights import SUPPORTED

pytestmark = pytest.mark.mindspore


def test_the_table_marks_verified_exactly_what_the_backend_takes():
    verified = {k for k, a in ARCHITECTURES.items() if a.mindspore.startswith(VERIFIED)}
    assert verified == set(SUPPORTED)


@pytest.mark.parametrize("model_type", [a for a in ARCHITECTURES if a not in SUPPORTED])
def test_other_architectures_are_refused_at_validation(tmp_path, tiny_llama, model_type):
    model = tmp_path / model_type
    shutil.copytree(tiny_llama, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": model_type}))
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    spec = tmp_path / "c.yaml"
    spec.write_text(f"backend: mindspore\ndata: {{train: d.jsonl}}\nmodel: {model}\n")
    with pytest.raises(ConfigError, match=rf"model_type '{model_type}'.*takes llama, qwen2"):
        load_config(spec)
