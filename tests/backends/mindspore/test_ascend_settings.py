"""Ascend settings of the `mindspore:` section and `train.*` in the generated MindFormers YAML, and
the combinations refused at validation (exit code 2, no traceback).

No Ascend device here: each value is checked where MindFormers reads it (the YAML, the workers'
environment); fp16 + loss scaling + recompute also train for real on CPU.

$ .venvs/ms/bin/python -m pytest tests/backends/mindspore/test_ascend_settings.py
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

pytest.importorskip("mindspore")

from sft.cli import main
from sft.config import load_config
from sft.errors import ConfigError
from sft_mindspore import runtime
from sft_mindspore.data import build_schedule
from sft_mindspore.launch import launch_plan, worker_env
from sft_mindspore.mfconfig import build_yaml
from sft_mindspore.plugin import MindSporeOptions

from tests.backends.mindspore.conftest import make_plan, synthetic_split

pytestmark = pytest.mark.mindspore


def _config(tmp_path, text: str, model=None):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    path = tmp_path / "c.yaml"
    head = "backend: mindspore\ndata: {train: d.jsonl}\n" + (f"model: {model}\n" if model else "")
    path.write_text(head + text)
    return path


def ascend_doc(tmp_path, model, text: str, detected=(None, None)) -> dict:
    """The MindFormers YAML sft generates for this spec on an Ascend host that reports
    `detected` = (device kind, memory GB)."""
    cfg = load_config(_config(tmp_path, text, model))
    opts = MindSporeOptions.model_validate(cfg.options)
    plan = dataclasses.replace(make_plan(tmp_path / "run", model), config=cfg, options=opts)
    schedule = build_schedule(synthetic_split(64), cfg, cfg.parallel.world_size)
    settings = runtime.resolve(cfg, opts, "Ascend", detected)
    return build_yaml(plan, schedule, "init.ckpt", "train.mindrecord", "Ascend", "out", settings)


ASCEND = "mindspore: {device_target: Ascend%s}\n"


@pytest.mark.parametrize(
    "extra,detected,want",
    [
        # nothing known about the device: bf16, a size that fits a 32 GB card
        ("", (None, None), {"compute": "bfloat16", "memory": "29GB", "scale": 1.0}),
        # MindSpore reports the device: its memory minus MindFormers' reserve
        ("", ("910B", 64.0), {"compute": "bfloat16", "memory": "58GB"}),
        ("", (None, 32.0), {"memory": "29GB"}),
        # a 910A has no bf16: auto precision is fp16 with dynamic loss scaling
        (
            "",
            ("910A", 32.0),
            {"compute": "float16", "softmax": "float32", "memory": "29GB", "scale": "dynamic"},
        ),
        (", device_kind: 910B4", (None, None), {"memory": "29GB", "compute": "bfloat16"}),
        (", device_kind: 910C", (None, None), {"memory": "58GB"}),
        # an explicit value always wins
        (", device_kind: 910B, max_device_memory: 40GB", ("910B", 64.0), {"memory": "40GB"}),
        (", jit_level: O0, memory_optimize_level: O0", (None, None), {"jit": "O0", "mol": "O0"}),
        ("", (None, None), {"jit": "O1", "mol": "O1"}),
    ],
)
def test_device_settings_reach_the_yaml(tmp_path, tiny_llama, extra, detected, want):
    doc = ascend_doc(tmp_path, tiny_llama, ASCEND % extra, detected)
    mc, ctx = doc["model"]["model_config"], doc["context"]
    assert mc["compute_dtype"] == want.get("compute", mc["compute_dtype"])
    assert mc["softmax_compute_type"] == want.get("softmax", "float32")
    assert mc["layernorm_compute_type"] == "float32" and mc["param_init_type"] == "float32"
    if "memory" in want:
        assert ctx["max_device_memory"] == want["memory"]
    assert ctx["jit_config"]["jit_level"] == want.get("jit", "O1")
    assert ctx["memory_optimize_level"] == want.get("mol", "O1")
    assert "device_id" not in ctx  # DEVICE_ID (rank table) or msrun decides
    scale = doc["runner_wrapper"]["scale_sense"]
    if want.get("scale") == "dynamic":
        assert scale == {**runtime.DYNAMIC_LOSS_SCALE, "loss_scale_value": scale_start(doc)}
    elif "scale" in want:
        assert scale == want["scale"]


def scale_start(doc):
    """2^16 over the power of two above the tokens one rank sums per step (per-token loss)."""
    runner, pc = doc["runner_config"], doc.get("parallel_config", {})
    rows = runner["batch_size"] * max(
        pc.get("micro_batch_num", 1), runner.get("gradient_accumulation_steps", 1)
    )
    tokens = rows * doc["model"]["model_config"]["seq_length"]
    value = runtime.initial_loss_scale(doc)
    assert value * tokens <= 65536 < 2 * value * tokens or value == 1
    return value


def test_fp16_loss_scale_starts_below_the_summed_token_gradient():
    doc = {
        "calculate_per_token_loss": True,
        "runner_config": {"batch_size": 2, "gradient_accumulation_steps": 1},
        "model": {"model_config": {"seq_length": 128}},
    }
    assert runtime.initial_loss_scale(doc) == 256  # 2^16 / 2^8 (256 tokens)
    assert runtime.initial_loss_scale({**doc, "calculate_per_token_loss": False}) == 65536


@pytest.mark.parametrize(
    "text,compute,scale",
    [
        ("train: {precision: fp32}\n", "float32", 1.0),
        ("train: {precision: bf16}\n", "bfloat16", 1.0),
        ("train: {precision: fp16}\n", "float16", runtime.DYNAMIC_LOSS_SCALE),
        (
            "train: {precision: fp16}\nmindspore: {device_target: Ascend, loss_scale: 1024.0}\n",
            "float16",
            1024.0,
        ),
    ],
)
def test_precision_maps_to_compute_types_and_loss_scale(tmp_path, tiny_llama, text, compute, scale):
    if "mindspore:" not in text:
        text += ASCEND % ""
    doc = ascend_doc(tmp_path, tiny_llama, text)
    mc = doc["model"]["model_config"]
    if scale == runtime.DYNAMIC_LOSS_SCALE:
        scale = {**scale, "loss_scale_value": scale_start(doc)}
    assert (mc["compute_dtype"], doc["runner_wrapper"]["scale_sense"]) == (compute, scale)
    assert mc["rotary_dtype"] == ("float16" if compute == "float16" else "float32")


def test_recompute_and_optimizer_shard(tmp_path, tiny_llama):
    base = "parallel: {nproc_per_node: 8}\n"
    doc = ascend_doc(tmp_path, tiny_llama, base + ASCEND % "")
    assert doc["recompute_config"]["recompute"] is False
    assert doc["parallel"]["enable_parallel_optimizer"] is True  # auto: dp 8 on Ascend
    assert doc["parallel"]["parallel_optimizer_config"]["parallel_optimizer_threshold"] == 64
    doc = ascend_doc(
        tmp_path,
        tiny_llama,
        base + "train: {gradient_checkpointing: true}\n" + ASCEND % ", optimizer_shard: false",
    )
    assert doc["recompute_config"]["recompute"] is True
    assert doc["parallel"]["enable_parallel_optimizer"] is False
    assert "parallel_optimizer_config" not in doc["parallel"]
    one = ascend_doc(tmp_path, tiny_llama, ASCEND % "")  # one device: nothing to shard over
    assert one["parallel"]["enable_parallel_optimizer"] is False


def test_hccl_settings_are_exported_to_every_worker(tmp_path):
    opts = MindSporeOptions(
        device_target="Ascend", hccl_connect_timeout=1200, hccl_exec_timeout=1800, hccl_buffsize=400
    )
    env = runtime.hccl_env(opts)
    assert env == {
        "HCCL_CONNECT_TIMEOUT": "1200",
        "HCCL_EXEC_TIMEOUT": "1800",
        "HCCL_BUFFSIZE": "400",
    }
    from sft.specs import ParallelSpec

    procs = launch_plan(
        tmp_path / "m.yaml", ParallelSpec(nproc_per_node=8, nnodes=2), tmp_path, env
    )
    assert len(procs) == 2 and all(p.env["HCCL_CONNECT_TIMEOUT"] == "1200" for p in procs)
    assert "HCCL_CONNECT_TIMEOUT=1200" in procs[1].shell()
    assert worker_env(tmp_path, 1, procs[0].env)["HCCL_EXEC_TIMEOUT"] == "1800"


@pytest.mark.parametrize(
    "text,match",
    [
        (
            "train: {precision: bf16}\nmindspore: {device_target: Ascend, device_kind: 910A}\n",
            "bf16 is not supported by Ascend 910A.*use train.precision: fp16",
        ),
        (
            "train: {precision: bf16}\nmindspore: {device_target: CPU}\n",
            "on CPU use train.precision: fp32",
        ),
        ("mindspore: {device_target: CPU, jit_level: O2}\n", "O2.*only on Ascend"),
        (
            "parallel: {nproc_per_node: 2}\nmindspore: {device_target: CPU, optimizer_shard: true}\n",
            "optimizer_shard.*Ascend",
        ),
        ("mindspore: {device_target: Ascend, optimizer_shard: true}\n", "with one device"),
        (
            "mindspore: {device_target: Ascend, loss_scale: 1024.0}\n",
            "loss scaling applies to fp16",
        ),
        ("mindspore: {device_target: Ascend, max_device_memory: 58G}\n", "like '58GB'"),
        (
            "mindspore: {device_target: CPU, device_kind: 910B}\n",
            "device_kind.*device_target is CPU",
        ),
        ("method: {name: lora, target_modules: [c_attn]}\n", "c_attn.*no MindFormers counterpart"),
    ],
)
def test_bad_combinations_are_config_errors(tmp_path, capsys, text, match):
    path = _config(tmp_path, text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)
    assert main(["config", "validate", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err


def test_detected_910a_refuses_bf16_when_the_run_starts(tmp_path, tiny_llama):
    with pytest.raises(ConfigError, match="910A"):
        ascend_doc(tmp_path, tiny_llama, "train: {precision: bf16}\n" + ASCEND % "", ("910A", 32.0))


def _model_of_type(tmp_path, tiny_llama, model_type: str, **extra):
    import shutil

    model = tmp_path / f"model-{model_type}"
    shutil.copytree(tiny_llama, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update({"model_type": model_type, **extra})
    (model / "config.json").write_text(json.dumps(cfg))
    return model


def test_unsupported_models_are_refused_at_validation(tmp_path, tiny_llama, monkeypatch):
    # before any weight is converted: hf_to_ckpt must not even be reached
    import sft_mindspore.weights as weights

    monkeypatch.setattr(weights, "hf_to_ckpt", lambda *a: pytest.fail("converted weights"))
    mistral = _model_of_type(tmp_path, tiny_llama, "mistral", architectures=["MistralForCausalLM"])
    with pytest.raises(
        ConfigError, match=r"model_type .mistral. .*MistralForCausalLM.*--backend torch"
    ):
        load_config(_config(tmp_path, "", mistral))
    yarn = _model_of_type(
        tmp_path, tiny_llama, "llama", rope_scaling={"rope_type": "yarn", "factor": 4.0}
    )
    with pytest.raises(ConfigError, match=r"model\.name_or_path: rope scaling .yarn."):
        load_config(_config(tmp_path, "", yarn))
    load_config(_config(tmp_path, "", tiny_llama))  # control: a llama passes


@pytest.mark.slow
def test_fp16_with_loss_scaling_and_recompute_trains_on_cpu(tmp_path, tiny_llama):
    """fp16 + MindFormers' dynamic loss scale + recompute really run (CPU has fp16 kernels): the
    first-step loss is torch's fp32 loss up to half-precision rounding, not bit-equal to it."""
    from sft.events import RunEvents
    from sft.plugins import get_plugins
    from sft_mindspore.train import train

    from tests.backends.mindspore.conftest import first_step_batch, metrics, torch_losses

    plan = make_plan(
        tmp_path / "run",
        tiny_llama,
        "lora",
        train={"max_steps": 3, "precision": "fp16", "gradient_checkpointing": True},
    )
    train(plan, RunEvents(plan.config, plan.run_dir, get_plugins().hook))
    log = (plan.run_dir / "mindformers" / "worker_0.log").read_text()
    doc = yaml.safe_load((plan.run_dir / "mindformers.yaml").read_text())
    start = doc["runner_wrapper"]["scale_sense"]["loss_scale_value"]
    assert start < 65536  # per-token loss: the summed gradient would overflow fp16 at 2^16
    assert f"loss_scale: {float(start)}" in log and "_recompute:True" in log
    assert "overflow cond: True" not in log
    rows = metrics(plan.run_dir)
    assert len(rows) == 3 and not any(r.get("skipped") for r in rows)
    (ref,) = torch_losses([(tiny_llama, first_step_batch(plan.run_dir, 2), None)], tmp_path / "t")
    # measured: fp16 1.8e-5 from torch's fp32, MindFormers fp32 2.0e-6
    assert 5e-6 < abs(rows[0]["loss"] - ref) < 2e-2, (rows[0]["loss"], ref)
