"""benchmarks/trl_compare.py's `--method full` and `--global-batch` (issue #19): the generated
sft config and the TRL peer train the same thing (every weight, or the same LoRA), and bad
options are refused (fast: no training, no TRL, which lives only in the bench venv); and
benchmarks/startup.py's phases (one tiny-model step in a fresh process).

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_trl_compare.py -q
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sft.config import load_config

pytestmark = pytest.mark.torch

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "trl_compare.py"


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tc():
    return load("trl_compare", SCRIPT)


def generated(
    tc, tmp_path: Path, model: Path, method: str, global_batch: int = 8, precision: str = "auto"
):
    data = tmp_path / "chats.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    path = tc.sft_config(tmp_path / "c.yaml", model, data, 1, method, global_batch, precision)
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


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
def test_precision_reaches_the_sft_config(tc, tmp_path, tiny_llama, precision):
    """`--precision fp32` measures the fp32 path on a bf16 CPU (issue #19 target 2 on AVX-512):
    the sft side of the comparison trains in what was asked, not in `auto`'s choice."""
    assert generated(tc, tmp_path, tiny_llama, "lora", precision=precision).train.precision == (
        precision
    )


def test_bad_options_are_refused(tc):
    with pytest.raises(ValueError, match="--method"):
        tc.method_yaml("qlora")
    for bad in (["--method", "qlora"], ["--global-batch", "0"], ["--precision", "fp16"]):
        out = subprocess.run(
            [sys.executable, str(SCRIPT), *bad], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 2, out.stderr
        assert bad[0] in out.stderr


STARTUP = SCRIPT.parent / "startup.py"


@pytest.mark.slow
def test_startup_phases_add_up_to_the_first_step(tmp_path, tiny_llama):
    """benchmarks/startup.py: one fresh process to the first optimizer step, every phase
    stamped in order, and the phases sum to the total it reports."""
    data = tmp_path / "chats.jsonl"
    chat = [{"role": "user", "content": "foxes?"}, {"role": "assistant", "content": "the fox"}]
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for _ in range(8)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {tiny_llama}\ndata: {{train: {data}, max_seq_len: 128}}\n"
        "method: {name: lora, r: 4}\ntrain: {global_batch_size: 4, micro_batch_size: 2}\n"
        "torch: {device: cpu, num_threads: 1}\n"
    )
    out = tmp_path / "startup.json"
    proc = subprocess.run(
        [sys.executable, str(STARTUP), "--config", str(cfg), "--runs", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "SFT_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run = json.loads(out.read_text())["runs"][0]
    phases = run["phases"]
    assert list(phases) == list(load("startup", STARTUP).PHASES)
    assert all(v["wall_s"] >= 0 and v["cpu_s"] >= 0 for v in phases.values())
    assert sum(v["wall_s"] for v in phases.values()) == pytest.approx(run["time_to_first_step_s"])
    assert phases["load"]["cpu_s"] > 0 and phases["first_step"]["cpu_s"] > 0
