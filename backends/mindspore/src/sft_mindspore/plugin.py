"""Registers the MindSpore backend with sft. Imports in milliseconds: mindspore is imported by
`train` (in the MindSpore environment).

    $ sft run --backend mindspore --config configs/smollm2-135m/lora.yaml \\
          data.eval=null eval.every_steps=null eval.prompts=null
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import sft
from pydantic import ValidationError
from sft.backend import TrainPlan, TrainResult, require_modules
from sft.errors import SftError
from sft.events import RunEvents
from sft.specs import RunConfig

from sft_mindspore.options import MindSporeOptions

INSTALL = "make venv-ms   (or: pip install -e backends/mindspore, which pins mindformers 1.9.0)"


class MindSporeBackend:
    name = "mindspore"
    description = "MindSpore + MindFormers (Ascend NPU, CPU); msrun for many cards/nodes"
    # no packing: on CPU the packed mask is wrong, and packed MindRecords (Ascend) are not written
    capabilities = frozenset(
        {
            "full",
            "lora",
            "ddp",
            "multi_node",
            "tensor_parallel",
            "pipeline_parallel",
            "context_parallel",
            "rank_table",
        }
    )
    install_hint = INSTALL
    Options = MindSporeOptions

    def check_available(self) -> None:
        require_modules(self.name, INSTALL, "mindspore", "mindformers")

    def validate(self, config: RunConfig) -> list[str]:
        try:
            opts = MindSporeOptions.model_validate(config.options)
        except ValidationError:  # reported by core's own check of the section
            opts = MindSporeOptions()
        from sft_mindspore.runtime import problems as device_problems
        from sft_mindspore.runtime import resolve_device

        try:
            device = resolve_device(opts)
        except SftError as exc:  # "mindspore.device_target: ..." as a config problem
            return [str(exc)]

        return (
            _method_problems(config)
            + _packing_problems(config, device)
            + _parallel_problems(config, device)
            + device_problems(config, opts, device)
            + _model_problems(config)
            + _launch_problems(config, device)
            + _unsupported_fields(config, device)
        )

    def plan_native(self, plan: TrainPlan) -> dict[str, Any]:
        """`sft run --dry-run`: the MindFormers YAML and every node's launch commands, written
        into the run directory without converting weights or writing data."""
        from sft_mindspore.train import plan_native

        return plan_native(plan)

    def default_packing(self, options: Any) -> bool:
        """`data.packing: auto` never packs here: on CPU the packed mask is wrong, and sft does
        not write packed MindRecords for Ascend's FlashAttention yet."""
        return False

    def train(self, plan: TrainPlan, events: RunEvents) -> TrainResult:
        from sft_mindspore.train import train

        return train(plan, events)

    def evaluate(self, model: str, data: Path, max_new_tokens: int) -> dict[str, Any]:
        """`eval.prompts` before and after training: MindFormers' greedy generation with the
        run's chat template (sft_mindspore.eval), no torch needed; in a child process, so the
        device memory it took is free again when the training workers start."""
        from sft_mindspore.eval import evaluate_in_subprocess

        return evaluate_in_subprocess(model, data, max_new_tokens)


def _method_problems(config: RunConfig) -> list[str]:
    # Core refuses qlora / freeze too (not in `capabilities`), but it can only name backends
    # installed here; the torch backend lives in another environment.
    m = config.method
    if m.name in ("qlora", "freeze"):
        return [
            f"method.name: {m.name!r} runs on the torch backend (--backend torch, installed "
            "with `make venv-torch`); MindFormers trains `full` and `lora`"
        ]
    if m.name != "lora":
        return []
    given = {
        "use_dora": m.use_dora,
        "use_rslora": m.use_rslora,
        "modules_to_save": bool(m.modules_to_save),
    }
    return [
        f"method.{key}: has no mindpet counterpart in MindFormers; remove it or use --backend torch"
        for key, on in given.items()
        if on
    ]


def _unsupported_fields(config: RunConfig, device: str) -> list[str]:
    """Fields this backend does not honour (yet), refused here instead of ignored."""
    from sft.models import resolvable_here

    c, problems = config, []
    why = resolvable_here(c.model.name_or_path)
    if why:
        problems.append(f"model.name_or_path: {why}")
    # data.eval / eval_fraction / eval.every_steps / max_batches: sft_mindspore.heldout
    if c.train.nan_policy == "skip":
        problems.append(
            "train.nan_policy: skip is not available on MindFormers (its train step has no "
            "hook to hold back one update); use nan_policy: stop, which stops at the first "
            "non-finite loss"
        )
    if c.train.max_consecutive_skips != 3:
        problems.append(
            "train.max_consecutive_skips: applies to nan_policy: skip, which the MindSpore "
            "backend does not have; remove it"
        )
    if c.parallel.cpu_offload:
        problems.append(
            "parallel.cpu_offload: MindFormers on this backend keeps optimizer state on the "
            "device; remove it (optimizer sharding over data parallel is the way to save memory)"
        )
    if c.parallel.deepspeed_config:
        problems.append("parallel.deepspeed_config: DeepSpeed is a torch-backend feature")
    if c.checkpoint.allow_changed:
        problems.append(
            "checkpoint.allow_changed: MindFormers resumes only the same run (its checkpoints "
            "hold no data fingerprint to relax); remove it"
        )
    if c.model.allow_pickle:
        problems.append(
            "model.allow_pickle: the MindSpore backend converts safetensors weights only; "
            "convert pickle weights to safetensors first"
        )
    # train.precision and train.gradient_checkpointing: honoured (sft_mindspore.runtime)
    if c.method.name == "lora" and c.method.init_adapter:
        problems.append(
            "method.init_adapter: the MindSpore backend cannot start LoRA from a PEFT adapter "
            "yet; merge it into the base first (`sft export ADAPTER_RUN --format hf` in the torch "
            "environment) and give that as model, or continue it with --backend torch"
        )
    if c.train.optimizer != "adamw":
        problems.append(
            f"train.optimizer: {c.train.optimizer} is not mapped to MindFormers here; the "
            "MindSpore backend trains with MindFormers' AdamW (optimizer: adamw)"
        )
    if c.model.dtype not in ("auto", "float32"):
        problems.append(
            f"model.dtype: {c.model.dtype} is not available on MindFormers here, whose "
            "parameters are float32 (param_init_type); train.precision sets the compute dtype"
        )
    return problems


def _packing_problems(config: RunConfig, device: str) -> list[str]:
    if config.data.packing is not True:
        return []
    if device == "CPU":
        return [
            "data.packing: packed rows need FlashAttention on Ascend (on CPU the packed "
            "attention mask is not applied correctly); set data.packing: false or auto"
        ]
    return [
        "data.packing: packed MindRecords (actual_seq_len for FlashAttention) are not written "
        "by sft's MindSpore backend yet; set data.packing: false or auto"
    ]


def _parallel_problems(config: RunConfig, device: str) -> list[str]:
    # parallel.strategy other than ddp is refused by core (fsdp/zero are torch capabilities)
    p, problems = config.parallel, []
    degrees = {
        "tensor_parallel": p.tensor_parallel,
        "pipeline_parallel": p.pipeline_parallel,
        "context_parallel": p.context_parallel,
    }
    model_parallel = [k for k, v in degrees.items() if v > 1]
    if device == "CPU":
        problems += [
            f"parallel.{key}: needs Ascend (MindSpore's semi-auto parallel); on CPU only data "
            "parallel works: set it to 1"
            for key in model_parallel
        ]
    prod = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
    if p.world_size % prod:
        problems.append(
            f"parallel.{model_parallel[0] if model_parallel else 'nproc_per_node'}: "
            f"tensor_parallel x pipeline_parallel x context_parallel = {prod} must divide the "
            f"device count {p.world_size} (nproc_per_node x nnodes); data parallel takes the rest"
        )
    return problems


def _launch_problems(config: RunConfig, device: str) -> list[str]:
    from sft.errors import ConfigError

    from sft_mindspore.launch import rank_table_path, read_rank_table

    p = config.parallel
    if p.rank_table_file and device == "CPU":
        return [
            "parallel.rank_table_file: a rank table describes Ascend devices for HCCL; on CPU "
            "remove it (msrun's dynamic cluster launches CPU workers)"
        ]
    if p.rank_table_file and p.world_size == 1:
        return [
            "parallel.rank_table_file: a rank-table launch starts several devices; with one "
            "device remove it, or set parallel.nproc_per_node / nnodes to the table's devices"
        ]
    table = rank_table_path(p, device)
    if table is None:
        return []
    try:
        read_rank_table(table, p)
    except ConfigError as exc:
        return [str(problem) for problem in exc.problems]
    return []


def _model_problems(config: RunConfig) -> list[str]:
    """What MindFormers' legacy llama cannot train, found before any weight is converted: LoRA
    targets without a MindFormers cell, and (when the model's config.json can be read here: a
    local directory or a built-in already converted) its architecture and rope scaling."""
    from sft.errors import SftError

    from sft_mindspore.mfconfig import lora_targets, rope_extension
    from sft_mindspore.weights import SUPPORTED

    out = []
    if config.method.name == "lora":
        try:
            lora_targets(config.method.target_modules)
        except SftError as exc:
            out += [str(p) for p in getattr(exc, "problems", [])] or [str(exc)]
    try:
        hf = _model_config_json(config.model.name_or_path)
    except (OSError, ValueError):  # a name no filesystem accepts: core reports the path
        hf = None
    if hf is None:
        return out
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        arch = ", ".join(hf.get("architectures") or []) or "?"
        out.append(
            f"model.name_or_path: model_type {kind!r} ({arch}) is not trained by the MindSpore "
            f"backend (MindFormers' legacy LlamaForCausalLM takes {', '.join(SUPPORTED)}); "
            "use --backend torch for this model"
        )
        return out
    try:
        rope_extension(hf)
    except SftError as exc:
        out.append("model.name_or_path: " + str(exc).removeprefix("model: "))
    return out


def _model_config_json(spec: str) -> dict[str, Any] | None:
    import json
    from pathlib import Path

    from sft.models import converted_builtin

    path = Path(spec).expanduser()
    if not path.is_dir():
        path = converted_builtin(spec) or path
    cfg = path / "config.json"
    return json.loads(cfg.read_text()) if cfg.is_file() else None


#: What an Ascend host has even before CANN's environment is sourced: the NPU device nodes and
#: the driver's `npu-smi` tool (MindSpore itself finds the devices through the CANN runtime).
@sft.hookimpl
def sft_register_backends(register: Any) -> None:
    register(MindSporeBackend())


@sft.hookimpl
def sft_register_exporters(register: Any) -> None:
    def export_ckpt(request: Any) -> Any:
        from sft_mindspore.export import export_ckpt as run

        return run(request)

    register("ckpt", export_ckpt, description="MindSpore .ckpt (MindFormers names), verified")
    if importlib.util.find_spec("sft_torch") is not None:
        return  # the torch backend's hf / adapter exporters (logit-verified) are installed

    def export_hf(request: Any) -> Any:
        from sft_mindspore.export import export_hf as run

        return run(request)

    def export_adapter(request: Any) -> Any:
        from sft_mindspore.export import export_adapter as run

        return run(request)

    register("hf", export_hf, description="merged HF safetensors (numpy; MindSpore env)")
    register("adapter", export_adapter, description="PEFT adapter of a LoRA run (MindSpore env)")


@sft.hookimpl
def sft_register_commands(cli: Any) -> None:
    from sft_mindspore.commands import register_commands

    register_commands(cli)


@sft.hookimpl
def sft_write_data(fmt: str, data: Any, out_dir: str, config: RunConfig) -> str | None:
    if fmt not in ("mindrecord", "hf-arrow"):
        return None
    from sft_mindspore.data import write_prepared

    return write_prepared(data, out_dir, config, fmt)
