"""The backend contract: what a training backend provides and what it receives.

A backend is "a training loop over integer arrays" plus its own weight and data formats. Core does
everything up to the tokenized cache (so every backend trains on identical token ids and loss
masks), then calls `backend.train(plan, events)`.

    from sft.backend import Backend, TrainPlan, TrainResult

    class MyBackend:
        name = "mine"
        description = "My accelerator"
        capabilities = frozenset({"lora", "full"})
        install_hint = "pip install sft-mine"
        Options = MyOptions                     # pydantic model of the `mine:` config section
        def check_available(self) -> None: ...  # raise BackendUnavailable(hint) if missing
        def validate(self, config) -> list[str]: return []
        def train(self, plan, events) -> TrainResult: ...
        # optional: generation for `eval.prompts` (validation refuses the field without it)
        def evaluate(self, model: str, data: Path, max_new_tokens: int) -> dict: ...

A backend refuses in `validate` every field it does not honour ("key.path: why; what works");
core adds which installed backends do honour it. See `plugins/example-backend` for a complete, tested template.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from sft.errors import SftError

if TYPE_CHECKING:
    from sft.data.cache import PreparedData
    from sft.events import RunEvents
    from sft.specs import RunConfig

#: Capability names core knows how to check against a config.
CAPABILITIES = {
    "full": "full fine-tuning",
    "lora": "LoRA adapters",
    "qlora": "LoRA on a 4/8-bit quantized base",
    "freeze": "freeze-tuning (chosen layers train)",
    "packing": "packed rows without cross-sample attention",
    "ddp": "data parallel over processes",
    "fsdp": "fully sharded data parallel",
    "zero2": "DeepSpeed ZeRO-2",
    "zero3": "DeepSpeed ZeRO-3",
    "multi_node": "more than one node",
    "tensor_parallel": "tensor (model) parallelism",
    "pipeline_parallel": "pipeline parallelism",
    "context_parallel": "context (sequence) parallelism",
    "rank_table": "launch from an Ascend HCCL rank table (parallel.rank_table_file)",
}


class BackendUnavailable(SftError):
    """The backend's framework is not installed or not usable; the message has the install
    command."""


class NoOptions(BaseModel):
    """A backend without options of its own."""

    model_config = ConfigDict(extra="forbid")


@runtime_checkable
class Backend(Protocol):
    """What every training backend provides. Importing the module that defines it must not
    import the framework: `check_available` uses `importlib.util.find_spec`, `train` imports."""

    name: str
    description: str
    capabilities: frozenset[str]
    install_hint: str
    Options: type[BaseModel]
    # optional: `trains = False` for a backend that only checks plans (the example template):
    # it is never named as a backend that honours a field another backend refuses

    def check_available(self) -> None:
        """Raise `BackendUnavailable` (with the exact install command) if it cannot run here."""

    def validate(self, config: RunConfig) -> list[str]:
        """Problems with this config that only this backend knows, as "key.path: message"."""

    def train(self, plan: TrainPlan, events: RunEvents) -> TrainResult:
        """Run the training described by `plan`, reporting through `events`."""


def require_modules(backend: str, hint: str, *modules: str) -> None:
    """Raise BackendUnavailable naming the first of `modules` that is not importable."""
    for mod in modules:
        if importlib.util.find_spec(mod) is None:
            raise BackendUnavailable(
                f"backend {backend!r} needs the Python package {mod!r}, which is not installed "
                f"in this environment. Install it with: {hint}"
            )


@dataclass(frozen=True)
class ResolvedModel:
    """The local Hugging Face model a run starts from (`sft.models.resolve_model`)."""

    path: Path
    """Local HF model directory (config.json, *.safetensors, tokenizer files)."""
    spec: str
    """What the config asked for."""
    model_type: str
    """`config.json`'s model_type (llama, qwen2, ...)."""
    config: dict[str, Any]
    """The parsed `config.json`."""


@dataclass
class TrainPlan:
    """Everything a backend needs, validated and resolved by core."""

    config: RunConfig
    """The validated job spec."""
    options: BaseModel
    """The backend's own section, validated by its `Options` model."""
    run_dir: Path
    """Where outputs go: metrics.jsonl, checkpoints/, final/, summary.json."""
    model: ResolvedModel
    """The local Hugging Face model directory to start from."""
    data: PreparedData
    """Tokenized train (and eval) data: token ids, labels, sample boundaries."""
    resume_from: Path | None = None
    """Checkpoint to resume from (resolved from `checkpoint.resume`), if any."""
    packing: bool = False
    """Whether rows are packed (resolved from `data.packing` and the backend's capabilities)."""


@dataclass
class TrainResult:
    """What a backend reports back; core writes it into `summary.json`."""

    steps: int
    """Optimizer steps taken in total (including those before a resume)."""
    final_loss: float | None
    """Mean training loss of the last logged step."""
    outputs: dict[str, str] = field(default_factory=dict)
    """Named output paths, e.g. `{"adapter": ".../final/adapter", "model": ...}`."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping: tokens/s, trained tokens, eval loss, elapsed seconds."""
