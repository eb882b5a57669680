"""benchmarks/trl_compare.py's `--method full` and `--global-batch` (issue #19): the generated
sft config and the TRL peer train the same thing (every weight, or the same LoRA), and bad
options are refused. Fast: no training, no TRL (it lives only in the bench venv).

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_trl_compare.py -q
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from sft.config import load_config

pytestmark = pytest.mark.torch

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "trl_compare.py"


@pytest.fixture(scope="module")
def tc():
    spec = importlib.util.spec_from_file_location("trl_compare", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def generated(tc, tmp_path: Path, model: Path, method: str, global_batch: int = 8):
    data = tmp_path / "chats.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    path = tc.sft_config(tmp_path / "c.yaml", model, data, 1, method, global_batch)
    return load_config(path, backend="torch")


def test_full_config_trains_every_weight(tc, tmp_path, tiny_llama):
    cfg = generated(tc, tmp_path, tiny_llama, "full", global_batch=2)
    assert cfg.method.name == "full"
    assert cfg.train.global_batch_size == 2 and cfg.train.micro_batch_size == 1
    assert tc.trl_peft_config("full") is None  # TRL without a peft config trains every weight


def test_lora_config_matches_the_trl_peer(tc, tmp_path, tiny_llama):
    cfg = generated(tc, tmp_path, tiny_llama, "lora")
    peft = tc.trl_peft_config("lora")
    assert cfg.method.name == "lora" and cfg.train.global_batch_size == tc.GLOBAL_BATCH
    assert (cfg.method.r, cfg.method.alpha, cfg.method.dropout) == (
        peft.r,
        peft.lora_alpha,
        peft.lora_dropout,
    )


def test_bad_options_are_refused(tc):
    with pytest.raises(ValueError, match="--method"):
        tc.method_yaml("qlora")
    for bad in (["--method", "qlora"], ["--global-batch", "0"]):
        out = subprocess.run(
            [sys.executable, str(SCRIPT), *bad], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 2, out.stderr
        assert bad[0] in out.stderr
