"""The speed levers of a torch run, decided in one place.

`resolve_levers` says which `torch:` options (and which batching settings) take effect for this
device, precision and number of processes, before the model exists; the trainer applies them,
completes what only the loaded model can tell (`Levers.with_model`: a plain logits head for the
chunked loss, the packed-attention mode, how many peft Linears were fused ...) and reports the
result at train start and in summary.json (`Trainer.info`). `sft bench` prints that same report,
so the levers it shows are the ones the loop ran with.

    levers = resolve_levers(plan, device, precision, world)   # before loading the model
    torch.set_num_threads(levers.threads)
    ...                                                       # load, apply the levers
    levers = levers.with_model(chunked_loss=..., fused_lora=..., ...)
    levers.report()          # {"packing": True, "chunked_loss": True, "fused_loss": True, ...}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sft.backend import TrainPlan

from sft_torch.options import torch_options
from sft_torch.runtime import physical_cores


@dataclass(frozen=True)
class Levers:
    """What a run does for speed. Before the model is loaded the model-dependent fields hold
    the options (`attn_implementation: auto`, `micro_batch_threads: None` ...); `with_model`
    replaces them with what was applied."""

    threads: int
    """torch's intra-op threads (`torch.set_num_threads`)."""
    packing: bool
    group_by_length: bool
    """Rows grouped by length (only without packing)."""
    micro_batch_size: int
    gradient_checkpointing: bool
    chunked_loss: bool
    fused_loss: bool
    """Fused linear + cross-entropy inside the chunked loss."""
    attn_implementation: str
    packed_attention: str
    bf16_frozen_weights: bool
    fast_dropout: bool
    fused_lora: bool
    compile: bool
    release_memory: bool
    keep_memory: bool
    """CPU without `release_memory`: freed memory stays in the process for the next step
    (`sft_torch.runtime.keep_freed_memory`) and the chunked loss reuses its logits buffer."""
    micro_batch_threads: int | None

    def with_model(self, **applied: Any) -> Levers:
        """These levers with the values the loaded model settled (see the module docstring)."""
        return dataclasses.replace(self, **applied)

    def report(self) -> dict[str, Any]:
        """The levers as the run reports them (`Trainer.info`, `sft bench`'s `levers`)."""
        return dataclasses.asdict(self)


def resolve_levers(plan: TrainPlan, device: Any, precision: str, world: int) -> Levers:
    """The levers of `plan` on `device` (a torch.device), computing in `precision`, with `world`
    processes. Single-process-only levers stay off with several processes, so FSDP / DeepSpeed
    never see mixed parameter dtypes or swapped LoRA Linears (DDP only wraps the model)."""
    import torch

    opts, cfg = torch_options(plan), plan.config
    cpu = device.type == "cpu"
    return Levers(
        # an explicit torch.num_threads wins; torch's default may count hyper-threads
        threads=opts.num_threads or min(torch.get_num_threads(), physical_cores()),
        packing=plan.packing,
        group_by_length=cfg.data.group_by_length and not plan.packing,
        micro_batch_size=cfg.train.micro_batch_size,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        chunked_loss=opts.chunked_loss,
        fused_loss=opts.chunked_loss and opts.fused_loss,
        attn_implementation=opts.attn_implementation,
        packed_attention=opts.packed_attention,
        bf16_frozen_weights=opts.bf16_frozen_weights
        and precision == "bf16"
        and cfg.method.name == "lora"
        and world == 1,
        fast_dropout=opts.fast_dropout and cpu,
        fused_lora=opts.fused_lora and (world == 1 or cfg.parallel.strategy == "ddp"),
        compile=opts.compile,
        release_memory=opts.release_memory,
        keep_memory=cpu and not opts.release_memory,
        micro_batch_threads=opts.micro_batch_threads,
    )
