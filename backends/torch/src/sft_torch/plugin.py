"""Registers the torch backend with sft. Imports in milliseconds: torch is imported by `train`.

    $ sft run --backend torch --config configs/smollm2-135m/lora.yaml
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

import sft
from sft.backend import TrainPlan, TrainResult, require_modules
from sft.events import RunEvents
from sft.specs import RunConfig

INSTALL = "pip install torch==<version for your CUDA> && pip install -e backends/torch"


class TorchOptions(BaseModel):
    """The `torch:` section of a job spec."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Device to train on. `auto`: cuda if available, else cpu."""

    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel passed to transformers."""


class TorchBackend:
    name = "torch"
    description = "PyTorch + transformers + peft (CPU, CUDA); torchrun, FSDP2, DeepSpeed"
    capabilities = frozenset({"full", "lora", "qlora", "freeze", "packing", "ddp", "fsdp",
                              "zero2", "zero3", "multi_node"})
    install_hint = INSTALL
    Options = TorchOptions

    def check_available(self) -> None:
        require_modules(self.name, INSTALL, "torch", "transformers", "peft", "safetensors")

    def validate(self, config: RunConfig) -> list[str]:
        return []

    def train(self, plan: TrainPlan, events: RunEvents) -> TrainResult:
        from sft_torch.train import train

        return train(plan, events)


@sft.hookimpl
def sft_register_backends(register: Any) -> None:
    register(TorchBackend())
