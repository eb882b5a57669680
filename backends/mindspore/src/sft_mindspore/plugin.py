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
        device = _device(opts)
        return (
            _method_problems(config)
            + _packing_problems(config, device)
            + _parallel_problems(config, device)
        )

    def default_packing(self, options: Any) -> bool:
        """`data.packing: auto` never packs here: on CPU the packed mask is wrong, and sft does
        not write packed MindRecords for Ascend's FlashAttention yet."""
        return False

    def train(self, plan: TrainPlan, events: RunEvents) -> TrainResult:
        from sft_mindspore.train import train

        return train(plan, events)


def _method_problems(config: RunConfig) -> list[str]:
    # Core refuses qlora / freeze too (not in `capabilities`), but it can only name backends
    # installed here; the torch backend lives in another environment.
    m = config.method
    if m.name in ("qlora", "freeze"):
        return [
            f"method.name: {m.name!r} runs on the torch backend (--backend torch, installed "
            "with `make venv-torch`); MindFormers trains `full` and `lora`"
        ]
    if m.name == "lora" and (m.use_dora or m.use_rslora or m.modules_to_save):
        return [
            "method: use_dora, use_rslora and modules_to_save have no mindpet counterpart; "
            "remove them or use --backend torch"
        ]
    return []


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
    if device == "CPU" and max(p.tensor_parallel, p.pipeline_parallel, p.context_parallel) > 1:
        problems.append(
            "parallel: tensor/pipeline/context parallelism needs Ascend (MindSpore's semi-auto "
            "parallel); on CPU only data parallel works: set them to 1"
        )
    prod = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
    if p.world_size % prod:
        problems.append(
            f"parallel: tensor_parallel x pipeline_parallel x context_parallel = {prod} must "
            f"divide the device count {p.world_size} (nproc_per_node x nnodes); data parallel "
            "takes the rest"
        )
    return problems


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
