"""The `Engine` the training loop calls instead of touching torch.distributed itself: plain
calls in a single process (`Engine`), DDP (`DDPEngine`), and the pieces the other engines share
(`ForwardRoot`, name-keyed optimizer states, whole-tensor state dict options). FSDP2 is
`sft_torch.fsdp.FSDPEngine`, DeepSpeed ZeRO-2/3 `sft_torch.deepspeed.DeepSpeedEngine`; which one a
run gets is `sft_torch.strategy.wrap_model`. Ranks and collectives are `sft_torch.distributed`.

    engine = wrap_model(model, plan, device)    # before the optimizer: FSDP2 swaps in DTensors
    engine.attach_optimizer(optimizer)          # DeepSpeed wraps it; a no-op otherwise
    for mb, weight in rank_micro_batches(schedule, step_rows):     # same count on every rank
        with engine.accumulate(last=...):                          # DDP no_sync / FSDP2 sync
            loss, n = engine.forward(batch_loss, batch, settings)  # through DDP / FSDP root
            engine.backward(loss * weight * world / n_global)
    grad_norm = engine.clip_grad_norm(params, max_norm)            # DTensor-aware
    engine.optimizer_step(scaler, optimizer)
    with engine.full_weights():  save on rank 0                    # FSDP2: gathered shards

Why the loss goes through `engine.forward(fn, ...)`: the chunked loss calls the decoder and the
output head separately, but DDP only syncs gradients of forwards that run through the DDP
wrapper, and FSDP2's root unshards the embeddings/head only in the root module's forward. So the
wrapper is a tiny root module whose forward runs `fn(model, *args)`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from sft.errors import SftError
from torch import nn

from sft_torch.distributed import world_size


class ForwardRoot(nn.Module):
    """The module DDP / FSDP2 wrap: its forward runs `fn(model, *args)`, so a loss that calls
    the model's pieces (decoder, head) still runs inside one wrapped forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)


class Engine:
    """Single process: plain calls. Subclasses add the strategy's communication."""

    strategy = "single"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(model, *args)` for training (gradients flow, and sync where the strategy does)."""
        return fn(self.model, *args, **kwargs)

    def evaluate(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(model, *args)` without gradients (eval, generation)."""
        with torch.no_grad():
            return fn(self.model, *args, **kwargs)

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Context for one micro-batch's forward + backward; gradients sync only when `last`."""
        return contextlib.nullcontext()

    owns_loss_scaling = False  # True: the engine scales fp16 losses, not torch.amp

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once the loop has built its optimizer (DeepSpeed wraps it)."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def optimizer_step(self, scaler: Any, optimizer: torch.optim.Optimizer) -> None:
        scaler.step(optimizer)

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """Inside, `self.model`'s parameters are whole ordinary tensors (for saving)."""
        yield

    # checkpoints: "whole" tensors and an index-keyed optimizer state (one process, DDP)
    checkpoint_format = "whole"

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "world_size": world_size(),
            "format": self.checkpoint_format,
        }

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if keyed_by_name(state):  # written by FSDP2: whole tensors keyed by parameter name
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            set_optimizer_state_dict(self.model, optimizer, state, options=full_options(False))
        else:
            optimizer.load_state_dict(state)

    #: Whether only rank 0 reads a checkpoint's files (the engine sends the other ranks their
    #: part); else every rank reads them.
    loads_on_rank0 = False

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)

    def check_resume(self, saved: dict[str, Any], ckpt: Any) -> None:
        """Every checkpoint format sft writes holds whole tensors and a global data position,
        so any strategy resumes it at any world size; refuse only what is not such a file."""
        fmt = saved.get("format", "whole")
        if fmt == "deepspeed":
            raise SftError(
                f"checkpoint.resume: {ckpt} is a DeepSpeed checkpoint (per-rank partitions); "
                f"resume it with parallel.strategy={saved.get('strategy')} on "
                f"{saved.get('world_size')} processes, not parallel.strategy {self.strategy}"
            )
        if fmt not in ("whole", "fsdp-full"):
            raise SftError(
                f"checkpoint.resume: {ckpt} has checkpoint format {fmt!r} (strategy "
                f"{saved.get('strategy')}), which this version of sft cannot resume"
            )


def keyed_by_name(state: dict[str, Any]) -> bool:
    return any(isinstance(k, str) for k in state.get("state", {}))


def by_name(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> dict[str, Any]:
    """An index-keyed optimizer state (torch's own `state_dict()`) keyed by parameter name
    instead. Index i is the i-th parameter of the optimizer's groups, which sft builds in the
    same order whatever the strategy."""
    names = {id(p): n for n, p in model.named_parameters()}
    ordered = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [{**g, "params": [ordered[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {ordered[i]: v for i, v in state["state"].items()}, "param_groups": groups}


class DDPEngine(Engine):
    strategy = "ddp"

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__(model)
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        # No buffer sync in forward: buffers (rotary tables) are identical everywhere, and eval
        # runs outside the wrapper, where an unmatched broadcast would hang.
        # (torch >= 2.13 renamed broadcast_buffers to forward_sync_buffers)
        new = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        sync: dict[str, Any] = {"forward_sync_buffers" if new else "broadcast_buffers": False}
        self.ddp = DDP(ForwardRoot(model), device_ids=ids, **sync)

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.ddp(fn, *args, **kwargs)

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if last else self.ddp.no_sync()


def full_options(cpu_offload: bool = True, strict: bool = True, broadcast: bool = False) -> Any:
    """Whole (unsharded) state dicts. `broadcast`: loading, only rank 0 holds the whole state
    and torch sends each rank its shards, one tensor at a time."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(
        full_state_dict=True,
        cpu_offload=cpu_offload,
        strict=strict,
        broadcast_from_rank0=broadcast,
    )


def swap_parameters(model: nn.Module, full: Mapping[str, Any]) -> list[Any]:
    """Replace each parameter named in `full` by a plain Parameter holding the whole tensor
    (tied parameters stay tied); returns what to put back (FSDP2 and ZeRO-3 `full_weights`)."""
    by_id: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in full and id(param) not in by_id:
            by_id[id(param)] = nn.Parameter(full[name], requires_grad=param.requires_grad)
    originals = []
    for mod in model.modules():
        for name, held in list(mod._parameters.items()):
            if held is not None and id(held) in by_id:
                originals.append((mod, name, held))
                mod._parameters[name] = by_id[id(held)]
    return originals
