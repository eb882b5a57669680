"""Registers the torch backend with sft. Imports in milliseconds: torch is imported by `train`
(and by `validate` only for checks that need to ask the device, e.g. QLoRA or fp16).

    $ sft run --backend torch --config configs/smollm2-135m/lora.yaml
    $ sft run --config configs/smollm2-135m/lora.yaml torch.device=cpu torch.chunked_loss=false
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import sft
from pydantic import ValidationError
from sft.backend import TrainPlan, TrainResult, require_modules
from sft.events import RunEvents
from sft.rundir import config_path
from sft.specs import RunConfig

# hooks of sibling modules, registered through this entry-point module
from sft_torch.bench import sft_register_bench_command  # noqa: F401  (`sft bench`)
from sft_torch.commands import sft_register_commands  # noqa: F401
from sft_torch.export import sft_register_exporters  # noqa: F401
from sft_torch.model_sources import sft_resolve_model  # noqa: F401
from sft_torch.options import TorchOptions  # the `torch:` section

INSTALL = "pip install torch==<version for your CUDA> && pip install -e backends/torch"
QLORA_INSTALL = 'pip install "sft-torch[qlora]" (bitsandbytes, on a CUDA machine)'


class TorchBackend:
    name = "torch"
    description = "PyTorch + transformers + peft (CPU, CUDA); torchrun, FSDP2, DeepSpeed"
    capabilities = frozenset(
        {
            "full",
            "lora",
            "qlora",
            "freeze",
            "packing",
            "ddp",
            "fsdp",
            "zero2",
            "zero3",
            "multi_node",
        }
    )
    install_hint = INSTALL
    Options = TorchOptions

    def check_available(self) -> None:
        require_modules(self.name, INSTALL, "torch", "transformers", "peft", "safetensors")

    def validate(self, config: RunConfig) -> list[str]:
        try:
            opts = TorchOptions.model_validate(config.options)
        except ValidationError:
            return []  # core reports the section's own errors
        return (
            _device_problems(config, opts)
            + _precision_problems(config)
            + _strategy_problems(config, opts)
            + _optimizer_problems(config, opts)
        )

    def evaluate(self, model: str, data: Path, max_new_tokens: int) -> dict[str, Any]:
        """Generation tasks (and held-out loss) of `data` on `model` (`eval.prompts`)."""
        from sft_torch.commands import _threads
        from sft_torch.eval import evaluate

        _threads()
        return evaluate(model, data, max_new_tokens)

    def plan_native(self, plan: TrainPlan) -> dict[str, Any]:
        """`sft run --dry-run`: the command each node runs (torchrun for several processes)."""
        p, config = plan.config.parallel, str(config_path(plan.run_dir))
        if p.world_size == 1:
            return {"commands": {"node 0": [f"sft run --config {config}"]}}
        commands = {
            f"node {r}": [
                f"torchrun --nnodes {p.nnodes} --node_rank {r} --nproc_per_node "
                f"{p.nproc_per_node} --master_addr {p.master_addr} --master_port "
                f"{p.master_port} -m sft run --config {config} parallel.node_rank={r}"
            ]
            for r in range(p.nnodes)
        }
        return {"commands": commands, "summary": {"strategy": p.strategy}}

    def train(self, plan: TrainPlan, events: RunEvents) -> TrainResult:
        # Multi-process runs: re-launch through torchrun, or join the process group when this
        # is a torchrun worker (sft_torch.launch); a single process just trains.
        from sft_torch.imports import long_lived_imports

        with long_lived_imports("sft_torch.launch"):
            from sft_torch.launch import run_training  # torch

        return run_training(plan, events)


def _cuda_available() -> bool:
    # Only asked for configs that need a GPU, so plain configs never pay for importing torch.
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def _optimizer_problems(config: RunConfig, opts: TorchOptions) -> list[str]:
    """The bitsandbytes optimizers run on CUDA only."""
    name = config.train.optimizer
    if name not in ("adamw_8bit", "paged_adamw_8bit"):
        return []
    if importlib.util.find_spec("bitsandbytes") is None:
        return [
            f"train.optimizer: {name} needs bitsandbytes, which is not installed; install it "
            f"with: {QLORA_INSTALL}, or use optimizer: adamw"
        ]
    if opts.device == "cuda" or (opts.device == "auto" and _cuda_available()):
        return []
    return [
        f"train.optimizer: {name} (bitsandbytes) runs on CUDA GPUs only, and torch.device is "
        f"{opts.device!r} with no GPU here; use adamw, adafactor or sgd"
    ]


def _strategy_problems(config: RunConfig, opts: TorchOptions) -> list[str]:
    """What parallel.strategy cannot do here (sft_torch.strategy; torch-free)."""
    from sft_torch.strategy import strategy_problems

    device = opts.device if opts.device in ("cpu", "cuda") else None
    if device is None and config.parallel.cpu_offload and config.parallel.world_size > 1:
        device = "cuda" if _cuda_available() else "cpu"  # only then is torch asked
    return strategy_problems(config, device)


def _precision_problems(config: RunConfig) -> list[str]:
    """model.dtype / train.precision combinations the torch backend cannot train correctly."""
    dtype, precision = config.model.dtype, config.train.precision
    problems = []
    if dtype == "float16" and config.method.name == "full":
        problems.append(
            "model.dtype: float16 with method: full (torch backend): every parameter trains, and "
            "fp16 weights cannot be updated through a grad scaler (fp16 gradients cannot be "
            "unscaled) nor hold small updates. Use model.dtype: auto (fp32 master weights) with "
            "train.precision: fp16 for fp16 compute"
        )
    if precision == "fp32" and dtype in ("bfloat16", "float16"):
        problems.append(
            f"model.dtype: {dtype} contradicts train.precision: fp32 (torch backend): fp32 "
            "training keeps fp32 weights. Use model.dtype: auto, or train.precision: auto"
        )
    return problems


def _device_problems(config: RunConfig, opts: TorchOptions) -> list[str]:
    """Checks that depend on the device: QLoRA needs bitsandbytes + CUDA, fp16 needs a GPU."""
    problems: list[str] = []
    needs_gpu = config.method.name == "qlora" or config.train.precision == "fp16"
    cuda = opts.device == "cuda" or (needs_gpu and opts.device == "auto" and _cuda_available())
    if config.method.name == "qlora":
        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append(
                f"method.name: qlora needs bitsandbytes, which is not installed; "
                f"install it with: {QLORA_INSTALL}, or use method: lora"
            )
        elif not cuda:
            problems.append(
                "method.name: qlora needs a CUDA GPU (bitsandbytes 4/8-bit kernels) "
                f"but torch.device is {opts.device!r} with no GPU here; use "
                "method: lora on this machine"
            )
    if config.train.precision == "fp16" and not cuda:
        problems.append(
            "train.precision: fp16 training needs a CUDA GPU (no fp16 autocast "
            "with loss scaling on CPU); use precision: bf16 or fp32 here"
        )
    if config.model.dtype == "float16" and opts.device == "cpu":
        problems.append(
            "model.dtype: float16 needs a CUDA GPU (fp16 compute with loss scaling); use "
            "model.dtype: auto or bfloat16 with torch.device: cpu"
        )
    if opts.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            problems.append(
                "torch.attn_implementation: flash_attention_2 needs the flash-attn "
                "package (pip install flash-attn); use sdpa"
            )
        elif opts.device == "cpu":
            problems.append(
                "torch.attn_implementation: flash_attention_2 runs only on CUDA; use sdpa on CPU"
            )
    if opts.packed_attention == "segments" and opts.attn_implementation in (
        "eager",
        "flash_attention_2",
    ):
        problems.append(
            f"torch.packed_attention: segments runs sdpa per sample, not "
            f"{opts.attn_implementation}; use packed_attention: position_ids (with flash "
            "attention, sft passes each sample's varlen boundaries to the kernel)"
        )
    if opts.packed_attention == "mask" and opts.attn_implementation == "flash_attention_2":
        problems.append(
            "torch.packed_attention: flash attention takes no 4-D mask; use "
            "packed_attention: position_ids"
        )
    return problems


@sft.hookimpl
def sft_register_backends(register: Any) -> None:
    register(TorchBackend())
