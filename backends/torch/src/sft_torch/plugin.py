"""Registers the torch backend with sft. Imports in milliseconds: torch is imported by `train`
(and by `validate` only for checks that need to ask the device, e.g. QLoRA or fp16).

    $ sft run --backend torch --config configs/smollm2-135m/lora.yaml
    $ sft run --config configs/smollm2-135m/lora.yaml torch.device=cpu torch.chunked_loss=false
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import sft
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sft.backend import TrainPlan, TrainResult, require_modules
from sft.events import RunEvents
from sft.rundir import config_path
from sft.specs import RunConfig

from sft_torch.bench import sft_register_bench_command  # noqa: F401  (`sft bench`)
from sft_torch.commands import sft_register_commands  # noqa: F401  (hooks of sibling modules,
from sft_torch.export import sft_register_exporters  # noqa: F401   registered through this
from sft_torch.resolve import sft_resolve_model  # noqa: F401       entry-point module)

INSTALL = "pip install torch==<version for your CUDA> && pip install -e backends/torch"
QLORA_INSTALL = 'pip install "sft-torch[qlora]" (bitsandbytes, on a CUDA machine)'


class TorchOptions(BaseModel):
    """The `torch:` section of a job spec."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Device to train on. `auto`: cuda if available, else cpu."""

    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel passed to transformers. `auto`: sdpa where the model class has it, else
    eager (Gemma2: soft-capped scores); the run reports the choice (`attn_implementation`)."""

    chunked_loss: bool = True
    """Compute the loss from the final hidden states in chunks of trained positions, so the full
    [tokens x vocab] fp32 logits never exist at once (and masked prompt tokens cost no head
    matmul). `false`: the model's own forward with full logits."""

    loss_chunk_size: int = Field(1024, gt=0)
    """Trained positions per chunk of the chunked loss."""

    fused_loss: bool = True
    """With the chunked loss and a plain Linear head: compute each chunk's gradients in the
    forward pass (fused linear + cross-entropy), so backward does not recompute the chunk's
    logits. `false`: checkpoint each chunk and recompute it in backward."""

    packed_attention: Literal["auto", "segments", "position_ids", "mask"] = "auto"
    """How packed rows are kept from attending across samples. `segments`: sdpa runs causal
    attention on each sample of a row separately (only the scores within a sample are computed;
    `sft_torch.attention`). `position_ids`: pass position ids that restart per sample and no
    attention mask; transformers derives the block-diagonal mask from them, and sdpa computes
    the whole row under that mask (with flash_attention_2, sft passes each sample's varlen
    boundaries to the flash kernel itself, at any micro_batch_size). `mask`: an explicit
    4-D block-diagonal causal mask built from the sample lengths (eager / sdpa only). `auto`:
    `segments` with sdpa on models whose attention uses transformers' AttentionInterface (Llama,
    Qwen, Mistral, SmolLM ...), else `position_ids`."""

    num_threads: int | None = Field(None, gt=0)
    """CPU threads for torch (`torch.set_num_threads`). Default: torch's own choice, capped at
    the number of physical cores (hyper-threads only add contention to GEMMs)."""

    bf16_frozen_weights: bool = True
    """With bf16 precision and LoRA, keep the frozen base's Linear weights in bf16 instead of
    fp32. Autocast casts them to bf16 for every matmul anyway, so losses and gradients are
    bit-identical; this halves their memory and removes the per-step casts (and their saved
    copies). Adapters, norms and embeddings stay fp32. `false`: fp32 master copies."""

    fast_dropout: bool = True
    """On CPU, draw dropout masks (LoRA dropout) from 16-bit lanes of 64-bit random draws
    instead of torch's per-element Bernoulli sampling: 3x faster masks, p rounded to a multiple
    of 2^-16 (`sft_torch.model.FastDropout`). `false`: torch's nn.Dropout. No effect on GPU."""

    fused_lora: bool = True
    """Run each LoRA Linear (frozen base, adapter, its dropout) as one autograd Function: the
    scale goes on the rank-r intermediate, the adapter's output and input gradient are
    accumulated into the base's by the GEMMs, the dropout mask is applied once each way
    (`sft_torch.lora`). The same values as peft's forward, about 12% faster on a CPU LoRA step.
    Calls it cannot fuse (autocast, DoRA, merged or several adapters, quantized bases, FSDP /
    DeepSpeed parameters) run peft's forward. `false`: peft's forward always."""

    micro_batch_threads: int | None = Field(None, gt=0)
    """On CPU, run this many micro-batches of a step at once, each on its own thread with one
    intra-op thread (small GEMMs split over two threads ran at 1.6x one thread's speed, two
    independent GEMMs at 2x: a SmolLM2-135M LoRA step 1.12x faster on 2 cores; each thread
    holds its own activations). Gradients are summed in micro-batch order and dropout masks come
    from per-micro-batch generators, so runs are reproducible and resume exactly. Needs one
    process, no gradient checkpointing and every dropout a FastDropout (`fast_dropout`).
    Default: torch's thread count when that is 2-4 and a step has that many micro-batches and
    those conditions hold, else 1 (one micro-batch after the other)."""

    release_memory: bool = True
    """On Linux (glibc), serve allocations of 256 KiB and more with their own mmap, so freed
    tensors go back to the OS at once instead of staying in the heap: a SmolLM2-135M LoRA step
    on CPU peaked at 2.0 GB RSS instead of 3.6 GB, at the same speed
    (`sft_torch.runtime.release_freed_memory`). `false`: glibc's default."""

    compile: bool = False
    """Compile each decoder layer with `torch.compile` (in place: parameter names, checkpoints
    and exports are unchanged). Compiling takes minutes on CPU, so it pays off on long runs."""


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
        from sft_torch.launch import run_training

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
