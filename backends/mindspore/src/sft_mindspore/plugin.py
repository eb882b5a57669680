"""Registers the MindSpore backend with sft. Imports in milliseconds: mindspore is imported by
`train` (in the MindSpore environment).

    $ sft run --backend mindspore --config configs/qwen2-tiny/lora.yaml
"""

from __future__ import annotations

import os
from typing import Any, Literal

import sft
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sft.backend import TrainPlan, TrainResult, require_modules
from sft.events import RunEvents
from sft.specs import RunConfig

INSTALL = "make venv-ms   (or: pip install -e backends/mindspore, which pins mindformers 1.9.0)"


class MindSporeOptions(BaseModel):
    """The `mindspore:` section of a job spec."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    device_target: Literal["auto", "Ascend", "CPU"] = "auto"
    """Device: `Ascend` (NPU), `CPU`, or `auto` (Ascend when CANN is present, else CPU)."""

    threads: int | None = Field(None, gt=0)
    """CPU threads per worker (OMP_NUM_THREADS). Default: the machine's cores / workers."""


class MindSporeBackend:
    name = "mindspore"
    description = "MindSpore + MindFormers (Ascend NPU, CPU); msrun for many cards/nodes"
    # packing is Ascend-only (FlashAttention reads the packed mask); validate() refuses it on CPU.
    capabilities = frozenset(
        {
            "full",
            "lora",
            "packing",
            "ddp",
            "multi_node",
            "tensor_parallel",
            "pipeline_parallel",
            "context_parallel",
        }
    )
    install_hint = INSTALL
    Options = MindSporeOptions

    def check_available(self) -> None:
        require_modules(self.name, INSTALL, "mindspore", "mindformers")

    def validate(self, config: RunConfig) -> list[str]:
        problems = []
        try:
            opts = MindSporeOptions.model_validate(config.options)
        except ValidationError:  # reported by core's own check of the section
            opts = MindSporeOptions()
        if config.method.name in ("qlora", "freeze"):
            problems.append(
                f"method.name: {config.method.name!r} is not supported by the MindSpore backend "
                f"(MindFormers trains `full` and `lora`); use one of those, or run "
                f"{config.method.name} with --backend torch"
            )
        if config.method.name == "lora" and (
            config.method.use_dora or config.method.use_rslora or config.method.modules_to_save
        ):
            problems.append(
                "method: use_dora, use_rslora and modules_to_save have no mindpet "
                "counterpart; remove them or use --backend torch"
            )
        if config.data.packing is True and _device(opts) == "CPU":
            problems.append(
                "data.packing: packed rows need FlashAttention on Ascend (on CPU the "
                "packed attention mask is not applied correctly); set data.packing: "
                "false or auto, or run on Ascend"
            )
        if config.parallel.strategy != "ddp":
            problems.append(
                f"parallel.strategy: {config.parallel.strategy!r} is a torch "
                "strategy; MindSpore uses data/tensor/pipeline/context parallel degrees"
                " (parallel.tensor_parallel ...) with strategy: ddp"
            )
        p = config.parallel
        if (
            _device(opts) == "CPU"
            and max(p.tensor_parallel, p.pipeline_parallel, p.context_parallel) > 1
        ):
            problems.append(
                "parallel: tensor/pipeline/context parallelism needs Ascend "
                "(MindSpore's semi-auto parallel); on CPU only data parallel works: "
                "set them to 1"
            )
        world = p.world_size
        prod = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
        if world % prod:
            problems.append(
                f"parallel: tensor_parallel x pipeline_parallel x context_parallel = "
                f"{prod} must divide the device count {world} (nproc_per_node x nnodes)"
                "; data parallel takes the rest"
            )
        return problems

    def default_packing(self, options: Any) -> bool:
        """`data.packing: auto` packs only on Ascend (FlashAttention)."""
        return _device(options) != "CPU"

    def train(self, plan: TrainPlan, events: RunEvents) -> TrainResult:
        from sft_mindspore.train import train

        return train(plan, events)


def _device(options: Any) -> str:
    target = getattr(options, "device_target", "auto")
    if target != "auto":
        return str(target)
    ascend = any(os.environ.get(k) for k in ("ASCEND_HOME_PATH", "ASCEND_OPP_PATH"))
    return "Ascend" if ascend else "CPU"


@sft.hookimpl
def sft_register_backends(register: Any) -> None:
    register(MindSporeBackend())


@sft.hookimpl
def sft_register_exporters(register: Any) -> None:
    def export_ckpt(request: Any) -> Any:
        from sft_mindspore.export import export_ckpt as run

        return run(request)

    register("ckpt", export_ckpt, description="MindSpore .ckpt (MindFormers names), verified")


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
