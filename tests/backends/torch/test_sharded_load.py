"""FSDP2 loads the model on rank 0 only and shards it as it arrives (issue #20, item 4).

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_sharded_load.py

Every rank used to load the whole model before `fully_shard` cut it up, so a model larger than
one GPU could not train with the strategy meant for it. Now the other ranks build the model on
the meta device and receive their shards from rank 0 (`set_model_state_dict(...,
broadcast_from_rank0=True)`). Measured here with 2 processes on CPU (gloo): how much the peak
RSS of each process grows while the Trainer builds and shards a 50M-parameter model (200 MB in
fp32), against one process building it unsharded; then 2 steps of full fine-tuning must end on
the weights one process trains. Rank 0 still reads the whole model into its CPU memory to send
it (its growth is reported, not bounded).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

from tests.backends.torch.conftest import make_plan  # noqa: E402
from tests.backends.torch.test_distributed import free_port  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]

WORKER = """
import json, pickle, sys
import torch
from sft_torch import distributed
from sft_torch.train import Trainer, fit
from tests.backends.torch.conftest import events_for

plan = pickle.loads(open(sys.argv[1], "rb").read())
distributed.init_process_group(plan)
def rss(field):  # MiB
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)

# imports the build does on either path, so the growth measured below is the model's
import accelerate, peft, transformers.models.llama.modeling_llama  # noqa: E401
import torch.distributed.checkpoint.state_dict, torch.distributed.fsdp  # noqa: E401
import sft_torch.fsdp, sft_torch.methods  # noqa: E401

before = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # peak RSS (VmHWM) := current RSS
trainer = Trainer(plan, events_for(plan))
build = rss("VmHWM") - before
fit(trainer)
run = rss("VmHWM") - before
print("RESULT " + json.dumps({"rank": distributed.rank(), "build": build, "run": run}), flush=True)
distributed.destroy_process_group()
"""


@pytest.fixture(scope="module")
def model_50m(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """The tiny llama's tokenizer with a 50M-parameter llama (16 layers of width 512)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama50m")
    shutil.copytree(tiny_llama, path, dirs_exist_ok=True)
    config = json.loads((tiny_llama / "config.json").read_text())
    config.update(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config))
    for name in path.glob("*.safetensors"):
        name.unlink()
    model.save_pretrained(str(path))
    return path


def launch(tmp_path: Path, plan, world: int) -> list[dict]:
    blob, script = tmp_path / "plan.pkl", tmp_path / "worker.py"
    blob.write_bytes(pickle.dumps(plan))
    script.write_text(WORKER)
    repo = Path(__file__).resolve().parents[3]
    base = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(blob)],
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    results = []
    for r, p in enumerate(procs):
        out = p.communicate(timeout=300)[0]
        lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
        assert p.returncode == 0 and lines, f"rank {r}:\n{out[-4000:]}"
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    return results


def test_fsdp2_ranks_hold_their_shard_of_the_model(tmp_path: Path, model_50m: Path) -> None:
    """(ZeRO-3 is built partitioned too, `sft_torch.deepspeed.zero3_loading`, but on CPU its
    default bucket buffers dominate the RSS: 374 MiB per rank to build this model and 1220 MiB
    per rank for the run, more than one process; its correctness is tested by
    test_deepspeed_resume.py.)"""
    strategy = "fsdp"
    train = {"max_steps": 2, "learning_rate": 1e-4, "gradient_accumulation_steps": None}
    # release_memory: freed tensors leave the RSS, so the peak RSS follows what is live (with
    # glibc's heap, its retained free memory hides the shard's saving: 928 vs 926 MiB)
    common = {
        "method": "full",
        "n": 8,
        "train": {**train, "global_batch_size": 4},
        "torch_opts": {"release_memory": True},
    }
    one = make_plan(tmp_path / "one", model_50m, **common)
    (unsharded,) = launch(tmp_path / "one", one, world=1)
    two = make_plan(
        tmp_path / "two",
        model_50m,
        **common,
        parallel={"nproc_per_node": 2, "strategy": strategy},
    )
    ranks = launch(tmp_path / "two", two, world=2)
    model_mib = sum(t.numel() * 4 for t in load_file(str(model_50m / "model.safetensors")).values())
    model_mib /= 2**20
    print(
        f"model {model_mib:.0f} MiB; peak RSS growth (MiB) building the Trainer / whole run: "
        f"one process {unsharded['build']:.0f} / {unsharded['run']:.0f}, {strategy} rank 0 "
        f"{ranks[0]['build']:.0f} / {ranks[0]['run']:.0f}, rank 1 {ranks[1]['build']:.0f} / "
        f"{ranks[1]['run']:.0f}"
    )
    # building: rank 1 holds its half (the old path read the whole model on every rank, and
    # sharding it touched every page: 1x the model, plus the shard). (One process maps the
    # file without reading it until the first step, so its build growth is not the model's.)
    assert ranks[1]["build"] < 0.75 * model_mib
    # the whole run (full fine-tuning: weights, gradients, AdamW state): each rank well below
    # one process (measured 0.58-0.75: rank 0 also reads the whole model to send the shards,
    # and glibc's arenas vary with the machine's load)
    assert unsharded["run"] > 3 * model_mib  # the measurement sees them
    for r in ranks:
        assert r["run"] < 0.85 * unsharded["run"], r
    # and the sharded run trains what one process trains
    mine = load_file(str(tmp_path / "two" / "run" / "final" / "model" / "model.safetensors"))
    ref = load_file(str(tmp_path / "one" / "run" / "final" / "model" / "model.safetensors"))
    assert sorted(mine) == sorted(ref)
    worst = max(float((mine[k] - ref[k]).abs().max()) for k in ref)
    assert worst < 1e-5, f"final weights differ by {worst}"


@pytest.mark.parametrize("tied", [False, True])
def test_the_meta_model_has_rank_0s_parameters(
    tmp_path: Path, tiny_llama: Path, tied: bool
) -> None:
    """FSDP2 shards the same parameters on every rank: the empty model the other ranks build
    must have exactly the loaded one's, including a head tied to the embeddings (SmolLM2's):
    from_config left it untied, and gloo failed with a collective size mismatch."""
    from sft_torch.model import empty_model, load_model

    model = tmp_path / "m"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    config["tie_word_embeddings"] = tied
    (model / "config.json").write_text(json.dumps(config))
    if tied:  # a tied checkpoint stores the embeddings only
        from safetensors.torch import save_file

        weights = load_file(str(model / "model.safetensors"))
        del weights["lm_head.weight"]
        save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    plan = make_plan(tmp_path, model, method="full")
    loaded = load_model(plan, torch.device("cpu"))
    kwargs = {
        "dtype": torch.float32,
        "attn_implementation": "sdpa",
        "trust_remote_code": False,
    }
    empty = empty_model(plan, kwargs)

    def params(lm):
        return [(n, p.shape, p.dtype) for n, p in lm.named_parameters()]  # tied: listed once

    assert params(empty) == params(loaded)
    assert all(p.is_meta for p in empty.parameters())
    assert all(not b.is_meta for b in empty.buffers())  # rotary tables are computed
    assert (empty.lm_head.weight is empty.model.embed_tokens.weight) == tied
