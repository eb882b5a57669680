"""Job spec -> MindFormers YAML, and what the MindSpore backend refuses at validation.

$ .venvs/ms/bin/python -m pytest tests/backends/mindspore/test_config.py
"""

from __future__ import annotations

import pytest
import yaml

pytest.importorskip("mindspore")

from sft.config import load_config
from sft.errors import ConfigError, SftError
from sft.plugins import get_plugins
from sft.run import resolve_packing
from sft_mindspore.data import build_schedule
from sft_mindspore.mfconfig import build_yaml, lora_targets, parallel_degrees, rope_extension
from sft_mindspore.plugin import MindSporeOptions
from sft_mindspore.train import prepare

from tests.backends.mindspore.conftest import make_plan, synthetic_split
from tests.tiny import make_model

pytestmark = pytest.mark.mindspore


def _write(tmp_path, text: str, data: str = "{train: d.jsonl}"):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    model = tmp_path / "model"
    if not (model / "config.json").is_file():  # a local model: this env converts no built-in
        make_model(model)
    path = tmp_path / "c.yaml"
    head = f"backend: mindspore\ndata: {data}\n"
    if "model:" not in text:
        head += f"model: {model}\n"
    path.write_text(head + text)
    return path


def test_lora_targets_map_hf_names_to_mindformers_cells():
    assert lora_targets(["q_proj", "v_proj"]) == ".*wq$|.*wv$"
    assert lora_targets("all-linear").count("|") == 6
    assert lora_targets("(gate|up)_proj") == ".*w1$|.*w3$"
    with pytest.raises(ConfigError, match="no MindFormers counterpart"):
        lora_targets(["c_attn"])


def test_yaml_carries_the_spec(tmp_path, tiny_qwen2):
    plan = make_plan(
        tmp_path / "run",
        tiny_qwen2,
        "lora",
        train={
            "max_grad_norm": 0.5,
            "lr_scheduler": "linear",
            "seed": 7,
            "gradient_accumulation_steps": 2,
            "max_steps": 3,
        },
    )
    yaml_path, schedule, _ = prepare(plan, "CPU")
    doc = yaml.safe_load(yaml_path.read_text())
    mc = doc["model"]["model_config"]
    assert mc["qkv_has_bias"] is True and mc["num_layers"] == 2 and mc["n_kv_heads"] == 2
    assert mc["pet_config"]["lora_rank"] == 8 and mc["pet_config"]["lora_alpha"] == 16
    assert doc["runner_wrapper"]["max_grad_norm"] == 0.5 and doc["seed"] == 7
    assert (
        doc["lr_schedule"]["type"] == "SftWarmUpDecayLR" and doc["lr_schedule"]["kind"] == "linear"
    )
    assert doc["calculate_per_token_loss"] is True
    assert doc["lr_schedule"]["total_steps"] == len(schedule.steps) == 3
    # CPU: accumulation folded into the batch, so one step sees micro x accumulation rows
    assert doc["runner_config"]["batch_size"] == 4 and schedule.rows_per_step == 4
    # the four CPU workarounds: two in the YAML, two applied by the worker script
    assert mc["use_rope_slice"] is True and mc["fused_rms_norm"] is False
    assert doc["context"]["device_target"] == "CPU"
    assert "mindformers.yaml" in yaml_path.read_text().splitlines()[1]


def test_ascend_yaml_has_no_cpu_workarounds(tmp_path, tiny_llama):
    plan = make_plan(tmp_path / "run", tiny_llama, "full", train={"max_steps": 2})
    schedule = build_schedule(synthetic_split(), plan.config, 1)
    doc = build_yaml(plan, schedule, "init.ckpt", "train.mindrecord", "Ascend", "out")
    mc = doc["model"]["model_config"]
    assert "use_rope_slice" not in mc and "fused_rms_norm" not in mc
    assert mc["compute_dtype"] == "bfloat16" and mc["use_flash_attention"] is True
    assert "pet_config" not in mc


def test_parallel_degrees_must_multiply_to_the_device_count(tmp_path):
    cfg = load_config(
        _write(
            tmp_path,
            "parallel: {nproc_per_node: 8, tensor_parallel: 2, pipeline_parallel: 2}\n"
            "mindspore: {device_target: Ascend}\n",
        )
    )
    assert parallel_degrees(cfg) == {"dp": 2, "mp": 2, "cp": 1, "pp": 2}
    with pytest.raises(ConfigError, match="tensor_parallel"):
        load_config(_write(tmp_path, "parallel: {nproc_per_node: 6, tensor_parallel: 4}\n"))


@pytest.mark.parametrize(
    "text,match",
    [
        ("method: qlora\n", "qlora.*--backend torch"),
        ("method: freeze\n", "'freeze' runs on the torch backend"),
        ("mindspore: {device_target: CPU}\n", "FlashAttention on Ascend"),
        ("parallel: {strategy: fsdp}\n", "does not support strategy 'fsdp'"),
        (
            "parallel: {nproc_per_node: 2, tensor_parallel: 2}\nmindspore: {device_target: CPU}\n",
            "needs Ascend",
        ),
    ],
)
def test_validation_refuses_what_mindformers_cannot_do(tmp_path, text, match):
    packing = "FlashAttention" in match
    data = "{train: d.jsonl, packing: true}" if packing else "{train: d.jsonl}"
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, text, data))


def test_packing_is_off_and_packing_true_is_refused(tmp_path):
    cfg = load_config(_write(tmp_path, "mindspore: {device_target: CPU}\n"))
    backend = get_plugins().backends.get("mindspore")
    assert resolve_packing(cfg, backend, MindSporeOptions(device_target="CPU")) is False
    assert resolve_packing(cfg, backend, MindSporeOptions(device_target="Ascend")) is False
    with pytest.raises(ConfigError, match="not written by sft's MindSpore backend yet"):
        load_config(
            _write(
                tmp_path, "mindspore: {device_target: Ascend}\n", "{train: d.jsonl, packing: true}"
            )
        )


def test_rope_scaling_maps_or_is_refused():
    llama3 = {
        "rope_type": "llama3",
        "factor": 8,
        "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    }
    ext = rope_extension({"rope_scaling": llama3})
    assert ext["extend_method"] == "LLAMA3" and ext["scaling_factor"]["factor"] == 8.0
    assert rope_extension({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}) == {}
    with pytest.raises(SftError, match="yarn"):
        rope_extension({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_msrun_failure_names_the_failed_rank(tmp_path):
    from sft.specs import ParallelSpec
    from sft_mindspore.launch import _failed_rank, _failure, msrun_command

    par = ParallelSpec(nproc_per_node=2, nnodes=2, node_rank=1, master_addr="10.0.0.1")
    cmd = msrun_command(tmp_path / "m.yaml", par, tmp_path)
    assert cmd[cmd.index("--worker_num") + 1] == "4"
    assert cmd[cmd.index("--local_worker_num") + 1] == "2"
    assert cmd[cmd.index("--node_rank") + 1] == "1"
    (tmp_path / "worker_2.log").write_text("step:[ 1/ 3], loss: 5.1\n")
    (tmp_path / "worker_3.log").write_text("Traceback (most recent call last):\nValueError: boom\n")
    rank, log = _failed_rank(tmp_path, par)
    assert (rank, log.name) == (3, "worker_3.log")
    assert "rank 3 failed" in _failure(rank, log, 1) and "ValueError: boom" in _failure(
        rank, log, 1
    )
