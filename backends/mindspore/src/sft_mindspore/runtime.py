"""Device settings of a MindFormers run: precision, memory, JIT, recompute, optimizer sharding,
pipeline micro-batches and HCCL, resolved from the spec and the `mindspore:` section.

Imports no framework (the plugin validates with it); only `detect_device` asks MindSpore, and only
on an Ascend host at YAML-generation time.

    settings = resolve(config, options, device="Ascend")     # raises ConfigError (exit code 2)
    apply(doc, settings, config)                             # into the MindFormers YAML dict
    env.update(hccl_env(options))                            # exported to every worker

What maps to what (spec -> MindFormers YAML):
    train.precision fp32|bf16|fp16 -> model_config compute_dtype / layernorm_compute_type /
                                      softmax_compute_type / rotary_dtype; fp16 adds
                                      runner_wrapper.scale_sense: DynamicLossScaleUpdateCell
    train.gradient_checkpointing   -> recompute_config.recompute
    mindspore.max_device_memory    -> context.max_device_memory
    mindspore.jit_level            -> context.jit_config.jit_level
    mindspore.memory_optimize_level-> context.memory_optimize_level
    mindspore.optimizer_shard      -> parallel.enable_parallel_optimizer (+ its config)
    parallel.pipeline_parallel     -> parallel_config.micro_batch_num, runner_config.batch_size
                                      (global batch = batch_size x dp x micro_batch_num)
"""

from __future__ import annotations

import glob
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

from sft.errors import ConfigError, Problem, SftError

ASCEND_DEVICE_GLOB = "/dev/davinci[0-9]*"


def ascend_hardware() -> str | None:
    """Evidence of Ascend NPUs on this machine (a device node or npu-smi), or None."""
    nodes = sorted(glob.glob(ASCEND_DEVICE_GLOB))
    if nodes:
        return f"NPU devices {', '.join(nodes[:4])}"
    tool = shutil.which("npu-smi")
    return f"the Ascend driver's {tool}" if tool else None


def resolve_device(options: Any) -> str:
    """`device_target: auto`: Ascend when CANN's environment is set (as its set_env.sh does),
    CPU on a machine without NPUs; an NPU machine without CANN's environment is an error, not
    a silent CPU run."""
    target = getattr(options, "device_target", "auto")
    if target != "auto":
        return str(target)
    if any(
        os.environ.get(k) for k in ("ASCEND_HOME_PATH", "ASCEND_OPP_PATH", "ASCEND_TOOLKIT_HOME")
    ):
        return "Ascend"
    found = ascend_hardware()
    if found:
        raise SftError(
            f"mindspore.device_target: auto found {found} but no CANN environment "
            "(ASCEND_HOME_PATH is not set), so MindSpore would train on the CPU. Source CANN's "
            "environment first: `source /usr/local/Ascend/ascend-toolkit/set_env.sh` (or your "
            "CANN install's set_env.sh), or set mindspore.device_target: CPU to train on the CPU"
        )
    return "CPU"


#: Ascend chips sft knows: HBM per device (GB) and whether the cube units compute bf16.
DEVICE_KINDS = {
    "910A": {"memory_gb": 32, "bf16": False},
    "910B": {"memory_gb": 64, "bf16": True},  # 910B1/B2/B3 (Atlas 800T A2, 64 GB)
    "910B4": {"memory_gb": 32, "bf16": True},
    "910C": {"memory_gb": 64, "bf16": True},  # per die (Atlas 900 A3 SuperPoD)
}
#: max_device_memory when nothing says how large the device is: fits a 32 GB card.
FALLBACK_MEMORY = "29GB"
_MEMORY = re.compile(r"^\d+(\.\d+)?GB$")

_DTYPES = {  # compute, layernorm, softmax, rotary; parameters stay float32 (master weights)
    "fp32": ("float32", "float32", "float32", "float32"),
    "bf16": ("bfloat16", "float32", "float32", "float32"),
    "fp16": ("float16", "float32", "float32", "float16"),
}
#: MindFormers' dynamic loss scaling for fp16 (its reference configs use the same cell).
DYNAMIC_LOSS_SCALE: dict[str, Any] = {
    "type": "DynamicLossScaleUpdateCell",
    "loss_scale_value": 65536,
    "scale_factor": 2,
    "scale_window": 1000,
}


@dataclass
class Settings:
    """What `resolve` decided; `apply` writes it into the YAML."""

    device: str
    device_kind: str | None
    precision: str
    max_device_memory: str | None
    jit_level: str | None
    memory_optimize_level: str | None
    optimizer_shard: bool
    recompute: bool
    loss_scale: Any
    notes: list[str] = field(default_factory=list)


def memory_for(total_gb: float) -> str:
    """max_device_memory for a device of `total_gb`: what MindFormers' reference configs leave
    free (58GB of 64 GB), and 3 GB on smaller cards (29GB of 32 GB)."""
    reserve = 6 if total_gb >= 60 else 3
    return f"{max(1, math.floor(total_gb) - reserve)}GB"


def problems(config: Any, options: Any, device: str, detected: str | None = None) -> list[str]:
    """Everything about precision and the `mindspore:` device settings that cannot work, as
    "key.path: message" (the plugin's validation and `resolve` share this)."""
    out: list[str] = []
    kind = options.device_kind if options.device_kind != "auto" else detected
    precision = config.train.precision
    if device == "CPU":
        if precision == "bf16":
            out.append(
                "train.precision: bf16 has no MindSpore CPU kernels (bf16 Transpose); on CPU "
                "use train.precision: fp32 (or auto)"
            )
        if options.device_kind != "auto":
            out.append(
                f"mindspore.device_kind: {options.device_kind} names an Ascend chip but "
                "device_target is CPU; set mindspore.device_target: Ascend or remove device_kind"
            )
        if options.jit_level == "O2":
            out.append(
                "mindspore.jit_level: O2 (whole-graph sinking, GE) runs only on Ascend; on CPU "
                "use O0 or O1"
            )
        if options.optimizer_shard is True:
            out.append(
                "mindspore.optimizer_shard: the parallel optimizer needs semi-auto parallel on "
                "Ascend; on CPU set it to false (or auto)"
            )
    elif kind is not None and precision == "bf16" and not DEVICE_KINDS[kind]["bf16"]:
        out.append(
            f"train.precision: bf16 is not supported by Ascend {kind} (mindspore.device_kind); "
            "use train.precision: fp16 (with loss scaling) or fp32"
        )
    if options.loss_scale is not None and precision != "fp16":
        out.append(
            f"mindspore.loss_scale: loss scaling applies to fp16 only (train.precision is "
            f"{precision}); remove it or set train.precision: fp16"
        )
    if options.optimizer_shard is True and config.parallel.world_size == 1:
        out.append(
            "mindspore.optimizer_shard: shards optimizer state over data-parallel devices; "
            "with one device set it to false (or auto)"
        )
    return out


def resolve(
    config: Any, options: Any, device: str, detected: tuple[str | None, float | None] = (None, None)
) -> Settings:
    """The settings of this run; `detected` = (device kind, total memory in GB) from
    `detect_device()` on an Ascend host. Raises ConfigError on what the device cannot do."""
    kind_seen, total_gb = detected
    found = problems(config, options, device, kind_seen)
    if found:
        raise ConfigError([Problem(*p.split(": ", 1)) for p in found])
    kind = options.device_kind if options.device_kind != "auto" else kind_seen
    precision = config.train.precision
    if precision == "auto":
        bf16 = kind is None or DEVICE_KINDS[kind]["bf16"]
        precision = "fp32" if device == "CPU" else ("bf16" if bf16 else "fp16")
    memory, notes = options.max_device_memory, []
    if memory is None and device != "CPU":
        if total_gb:
            memory = memory_for(total_gb)
            notes.append(f"max_device_memory {memory}: the device reports {total_gb:.0f} GB")
        elif kind is not None:
            memory = memory_for(DEVICE_KINDS[kind]["memory_gb"])
            gb = DEVICE_KINDS[kind]["memory_gb"]
            notes.append(f"max_device_memory {memory}: Ascend {kind} has {gb} GB")
        else:
            memory = FALLBACK_MEMORY
            notes.append(f"max_device_memory {memory}: device size unknown, fits a 32 GB card")
    dp = _data_parallel(config)
    shard = options.optimizer_shard
    if shard == "auto":
        shard = device != "CPU" and dp > 1
    loss_scale = options.loss_scale if options.loss_scale is not None else "dynamic"
    return Settings(
        device=device,
        device_kind=kind,
        precision=precision,
        max_device_memory=memory,
        jit_level=options.jit_level or (None if device == "CPU" else "O1"),
        memory_optimize_level=options.memory_optimize_level or (None if device == "CPU" else "O1"),
        optimizer_shard=bool(shard),
        recompute=config.train.gradient_checkpointing,
        loss_scale=loss_scale if precision == "fp16" else None,
        notes=notes,
    )


def _data_parallel(config: Any) -> int:
    p = config.parallel
    return max(1, p.world_size // (p.tensor_parallel * p.pipeline_parallel * p.context_parallel))


def initial_loss_scale(doc: dict[str, Any]) -> int:
    """The dynamic loss scale to start from. With `calculate_per_token_loss` MindFormers
    differentiates the SUM of token losses (dividing by the token count afterwards), so the
    scaled gradients are up to tokens-per-step times those of a mean loss: 2^16 over the
    power of two above this rank's tokens per step keeps the usual 2^16 on a mean gradient
    instead of overflowing fp16 for the first log2(tokens) steps."""
    start = int(DYNAMIC_LOSS_SCALE["loss_scale_value"])
    if not doc.get("calculate_per_token_loss"):
        return start
    runner = doc["runner_config"]
    micro = int(doc.get("parallel_config", {}).get("micro_batch_num", 1))
    tokens = runner["batch_size"] * max(micro, runner.get("gradient_accumulation_steps", 1))
    tokens *= int(doc["model"]["model_config"]["seq_length"])
    return max(1, start >> max(0, (tokens - 1).bit_length()))


def apply(doc: dict[str, Any], s: Settings, config: Any) -> None:
    """Write the settings into a MindFormers YAML dict built by `mfconfig.build_yaml`."""
    mc = doc["model"]["model_config"]
    compute, norm, softmax, rotary = _DTYPES[s.precision]
    mc.update(
        {
            "compute_dtype": compute,
            "layernorm_compute_type": norm,
            "softmax_compute_type": softmax,
            "rotary_dtype": rotary,
            "param_init_type": "float32",
        }
    )
    wrapper = doc["runner_wrapper"]
    if s.precision == "fp16":
        if s.loss_scale == "dynamic":
            wrapper["scale_sense"] = {
                **DYNAMIC_LOSS_SCALE,
                "loss_scale_value": initial_loss_scale(doc),
            }
        else:
            wrapper["scale_sense"] = float(s.loss_scale)
    else:
        wrapper["scale_sense"] = 1.0
    ctx = doc["context"]
    for key, value in (
        ("max_device_memory", s.max_device_memory),
        ("memory_optimize_level", s.memory_optimize_level),
    ):
        if value is not None:
            ctx[key] = value
        else:
            ctx.pop(key, None)
    if s.jit_level is not None:
        ctx["jit_config"] = {"jit_level": s.jit_level}
    else:
        ctx.pop("jit_config", None)
    doc["recompute_config"] = {
        "recompute": s.recompute,
        "select_recompute": False,
        "parallel_optimizer_comm_recompute": False,
        "mp_comm_recompute": True,
        "recompute_slice_activation": False,
    }
    par = doc["parallel"]
    if s.device != "CPU":  # what MindFormers' reference finetune configs set on Ascend
        # semi-auto parallel with full_batch: the loss is already the global batch's mean
        par["gradients_mean"] = False
        # ops keep the dtype the model asks for (CANN may otherwise lower fp32 matmuls)
        ctx["ascend_config"] = {"precision_mode": "must_keep_origin_dtype"}
        doc["runner_config"]["sink_mode"] = True  # sink_size 1: one step per sink
    par["enable_parallel_optimizer"] = s.optimizer_shard
    if s.optimizer_shard:
        par["parallel_optimizer_config"] = {
            "gradient_accumulation_shard": False,
            "parallel_optimizer_threshold": 64,
        }
    else:
        par.pop("parallel_optimizer_config", None)
    apply_pipeline(doc, config)


def pipeline_layout(micro: int, accum: int, world: int, dp: int, pp: int) -> dict[str, int]:
    """runner_config.batch_size and micro_batch_num under pipeline parallelism.

    MindFormers (full_batch, pp > 1) ignores gradient_accumulation_steps and takes
    global batch = batch_size x data_parallel x micro_batch_num; sft's global batch is
    micro_batch_size x accumulation x devices. So batch_size = micro x (devices / dp / pp)
    (one pipeline micro-batch of a data-parallel group) and micro_batch_num = accumulation x pp,
    which also gives the pipeline at least pp micro-batches to fill its stages."""
    return {"batch_size": micro * (world // dp // pp), "micro_batch_num": accum * pp}


def global_batch(doc: dict[str, Any]) -> int:
    """The global batch MindFormers derives from a YAML on Ascend (semi-auto parallel,
    full_batch: True; `BaseTrainer._check_global_batch_size_for_auto_parallel` in 1.9)."""
    rc, pc = doc["runner_config"], doc["parallel_config"]
    interleave = doc.get("micro_batch_interleave_num", 1)
    if pc["pipeline_stage"] > 1:
        return rc["batch_size"] * pc["data_parallel"] * pc["micro_batch_num"] * interleave
    return rc["batch_size"] * pc["data_parallel"] * interleave * rc["gradient_accumulation_steps"]


def apply_pipeline(doc: dict[str, Any], config: Any) -> None:
    pc = doc["parallel_config"]
    pp = pc["pipeline_stage"]
    if pp <= 1:
        pc["micro_batch_num"] = 1  # MindFormers resets it to 1 without a pipeline anyway
        return
    world = config.parallel.world_size
    layout = pipeline_layout(
        config.train.micro_batch_size,
        config.train.accumulation(world),
        world,
        pc["data_parallel"],
        pp,
    )
    doc["runner_config"]["batch_size"] = layout["batch_size"]
    doc["runner_config"]["gradient_accumulation_steps"] = 1
    doc["model"]["model_config"]["batch_size"] = layout["batch_size"]
    for key in ("train_dataset", "train_dataset_task"):
        ds = doc[key] if key == "train_dataset" else doc[key]["dataset_config"]
        ds["batch_size"] = layout["batch_size"]
    pc["micro_batch_num"] = layout["micro_batch_num"]


def hccl_env(options: Any) -> dict[str, str]:
    """HCCL settings of the `mindspore:` section as the environment variables HCCL reads."""
    env = {}
    if options.hccl_connect_timeout is not None:
        env["HCCL_CONNECT_TIMEOUT"] = str(options.hccl_connect_timeout)
    if options.hccl_exec_timeout is not None:
        env["HCCL_EXEC_TIMEOUT"] = str(options.hccl_exec_timeout)
    if options.hccl_buffsize is not None:
        env["HCCL_BUFFSIZE"] = str(options.hccl_buffsize)
    if options.hccl_if_ip is not None:
        env["HCCL_IF_IP"] = options.hccl_if_ip
    return env


def detect_device() -> tuple[str | None, float | None]:
    """(device kind, total memory GB) of this host's Ascend device as MindSpore reports it, or
    (None, None) when it cannot tell (no CANN, no device)."""
    try:
        from mindspore._c_expression import MSContext  # type: ignore[import-not-found]

        soc = str(MSContext.get_instance().get_ascend_soc_version()).lower()
    except Exception:
        return None, None
    kind = None
    if soc in ("910a", "ascend910"):
        kind = "910A"
    elif soc.startswith("ascend910b4"):
        kind = "910B4"
    elif soc in ("910b", "ascend910b") or soc.startswith("ascend910b"):
        kind = "910B"
    elif soc.startswith("ascend910_93"):
        kind = "910C"
    total = None
    try:
        import mindspore as ms

        props = ms.hal.get_device_properties(0, "Ascend")
        total = float(props.total_memory) / 2**30 or None
    except Exception:
        pass
    return kind, total


def check_memory_value(value: str | None) -> str | None:
    if value is not None and not _MEMORY.match(value):
        raise ValueError(f"{value!r} is not a size like '58GB' (a number followed by GB)")
    return value
