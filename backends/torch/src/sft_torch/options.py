"""The `torch:` section of a job spec, typed: every option of the torch backend, its default
and what it does (the text `sft config explain` shows). Core validates the section with this
model (`TorchBackend.Options`), so `plan.options` of a torch run is a `TorchOptions`; the
backend reads it only through `torch_options(plan)`, never `getattr(opts, name, default)`, so
each default lives here alone. Imports no torch.

    $ sft config explain torch
    $ sft run --config configs/smollm2-135m/lora.yaml torch.device=cpu torch.chunked_loss=false

    opts = torch_options(plan)      # TorchOptions; opts.num_threads, opts.fused_lora, ...
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from sft.backend import TrainPlan


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
    instead of torch's per-element Bernoulli sampling (faster on CPU: docs/performance.md), p
    rounded to a multiple of 2^-16 (`sft_torch.dropout.FastDropout`). `false`: torch's nn.Dropout.
    No effect on GPU."""

    fused_lora: bool = True
    """Run each LoRA Linear (frozen base, adapter, its dropout) as one autograd Function: the
    scale goes on the rank-r intermediate, the adapter's output and input gradient are
    accumulated into the base's by the GEMMs, the dropout mask is applied once each way
    (`sft_torch.lora`). The same values as peft's forward, with fewer element-wise passes; under
    autocast (bf16 on CPU) in the autocast dtype, as peft's Linears would run, to bf16 rounding.
    Calls it cannot fuse (DoRA, merged or several adapters, quantized bases, FSDP / DeepSpeed
    parameters) run peft's forward. `false`: peft's forward always."""

    micro_batch_threads: int | None = Field(None, gt=0)
    """On CPU, run this many micro-batches of a step at once, each on its own thread with one
    intra-op thread (small GEMMs scale better side by side than split over threads: see
    docs/performance.md; each thread holds its own activations). Gradients are added into
    .grad in micro-batch order as they are produced and dropout masks come from per-micro-batch
    generators, so runs are reproducible and resume exactly. Needs one process, no gradient
    checkpointing and every dropout a FastDropout (`fast_dropout`). Default: torch's thread count
    when that is 2-4, a step has that many micro-batches, at most 10% of the parameters train
    (LoRA, not full fine-tuning: there a second thread's activations cost more memory than its
    speed is worth) and those conditions hold, else 1 (one micro-batch after the other)."""

    release_memory: bool = False
    """On Linux (glibc), `true`: serve allocations of 256 KiB and more with their own mmap, so
    freed tensors go back to the OS at once: a lower peak RSS, paid for in page faults, since
    every new activation is fresh memory the kernel must map and zero
    (`sft_torch.runtime.release_freed_memory`). `false` (default), on CPU: the opposite, the
    memory a step frees stays in the process for the next step (glibc's heaps are not trimmed:
    `sft_torch.runtime.keep_freed_memory`, and the chunked loss reuses its logits buffer), so
    steps after the first fault no memory in; it is returned when training ends. `true` where
    memory is tight (what each costs: docs/performance.md, "Measurements behind the
    defaults"). Where the environment sets glibc's malloc parameters
    (MALLOC_TOP_PAD_, MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_ or their glibc.malloc
    tunables) sft leaves malloc as set."""

    compile: bool = False
    """Compile each decoder layer with `torch.compile` (in place: parameter names, checkpoints
    and exports are unchanged). Compiling takes minutes on CPU, so it pays off on long runs."""


def torch_options(plan: TrainPlan) -> TorchOptions:
    """`plan.options` as the torch backend's typed options (core built them with
    `TorchBackend.Options`; anything else is a plan made for another backend)."""
    opts = plan.options
    if not isinstance(opts, TorchOptions):
        raise TypeError(
            f"plan.options is a {type(opts).__name__}, not TorchOptions: the plan was not "
            "built for the torch backend (sft.run.build_plan with backend torch)"
        )
    return opts
