"""Registers the MindSpore backend with sft. Imports in milliseconds: mindspore is imported by
`train` (in the MindSpore environment).

    $ sft run --backend mindspore --config configs/qwen2-tiny/lora.yaml
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

import sft
from sft.backend import TrainPlan, TrainResult, require_modules
from sft.events import RunEvents
from sft.specs import RunConfig

INSTALL = "make venv-ms   (or: pip install -e backends/mindspore, which pins mindformers 1.9.0)"


class MindSporeOptions(BaseModel):
    """The `mindspore:` section of a job spec."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    device_target: Literal["auto", "Ascend", "CPU"] = "auto"
    """Device: `Ascend` (NPU), `CPU`, or `auto` (Ascend when CANN is present, else CPU)."""


class MindSporeBackend:
    name = "mindspore"
    description = "MindSpore + MindFormers (Ascend NPU, CPU); msrun for many cards/nodes"
    capabilities = frozenset({"full", "lora", "packing", "ddp", "multi_node", "tensor_parallel",
                              "pipeline_parallel", "context_parallel"})
    install_hint = INSTALL
    Options = MindSporeOptions

    def check_available(self) -> None:
        require_modules(self.name, INSTALL, "mindspore", "mindformers")

    def validate(self, config: RunConfig) -> list[str]:
        return []

    def train(self, plan: TrainPlan, events: RunEvents) -> TrainResult:
        from sft_mindspore.train import train

        return train(plan, events)


@sft.hookimpl
def sft_register_backends(register: Any) -> None:
    register(MindSporeBackend())
