"""FSDP2 for the torch backend: `fully_shard` on every decoder layer and on a root holding the
whole model, and the consolidation of shards into the normal output and checkpoint formats.

    $ sft run --config configs/smollm2-135m/full.yaml parallel.nproc_per_node=8 \\
          parallel.strategy=fsdp

    engine = FSDPEngine(model, device, cpu_offload=False)   # via strategy.wrap_model
    with engine.full_weights():                             # every rank: gathers the shards
        save on rank 0                                      # plain tensors there

Works on CPU with gloo as well as on GPUs with nccl (CPU offload needs a GPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from sft.errors import SftError
from torch import nn

from sft_torch.distributed import broadcast_object, rank, world_size
from sft_torch.engine import (
    Engine,
    ForwardRoot,
    by_name,
    full_options,
    keyed_by_name,
    swap_parameters,
)


class FSDPEngine(Engine):
    """FSDP2: `fully_shard` on every decoder layer, then on a root holding the whole model
    (embeddings, final norm, head and any adapters outside the layers)."""

    strategy = "fsdp"

    def __init__(
        self, model: nn.Module, device: torch.device, cpu_offload: bool, from_rank0: bool = False
    ) -> None:
        """`from_rank0` (`distributed.loads_on_rank0`): only rank 0's model holds the weights
        (on the CPU), the others' parameters are on the meta device; each rank receives its
        shards from rank 0 right after sharding, one tensor at a time."""
        super().__init__(model)
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        full = model.state_dict() if from_rank0 and rank() == 0 else {}
        if from_rank0:
            same_parameters_as_rank0(model)
            same_rng_as_rank0()
        policy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
        mesh = init_device_mesh(device)
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, offload_policy=policy)
        self.root: Any = fully_shard(ForwardRoot(model), mesh=mesh, offload_policy=policy)
        if from_rank0:
            self._fill_from_rank0(full, torch.device("cpu") if cpu_offload else device)

    def _fill_from_rank0(self, full: dict[str, torch.Tensor], device: torch.device) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        if any(p.is_meta for p in self.model.parameters()):
            # storage for this rank's shards; to_empty also empties the (real) buffers
            buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
            self.model.to_empty(device=device)
            with torch.no_grad():
                for name, buf in self.model.named_buffers():
                    buf.copy_(buffers[name])
        state = cast(dict[str, Any], full)
        set_model_state_dict(self.model, state, options=full_options(False, broadcast=True))
        full.clear()  # rank 0: the whole weights can go

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.root(fn, *args, **kwargs)

    def evaluate(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.root(fn, *args, **kwargs)

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        self.root.set_requires_gradient_sync(last)  # type: ignore[operator]
        return contextlib.nullcontext()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full = getattr(norm, "full_tensor", None)  # a replicated DTensor over the mesh
        return float(full() if callable(full) else norm)

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """Consolidate the shards (a collective: every rank enters) with
        `get_model_state_dict(full_state_dict, cpu_offload)`; on rank 0 the model's parameters
        are whole CPU tensors inside the context, so the usual transformers / peft
        `save_pretrained` and checkpoint code write the normal formats. Restored afterwards."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(self.model, options=full_options())  # {} unless rank 0
        if rank() != 0:
            yield
            return
        originals = swap_parameters(self.model, full)
        try:
            yield
        finally:
            for mod, name, param in originals:
                mod._parameters[name] = param

    # checkpoints: whole tensors and an optimizer state keyed by parameter name, consolidated
    # on rank 0 (so a resume may use another number of processes)
    checkpoint_format = "fsdp-full"

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, optimizer, options=full_options())

    # Resuming, only rank 0 reads the checkpoint (into CPU memory); torch.distributed's
    # broadcast_from_rank0 sends every rank its shards one tensor at a time, so no rank ever
    # holds the whole optimizer state on its device.
    loads_on_rank0 = True

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if rank() == 0 and not keyed_by_name(state):  # written by one process or DDP
            state = by_name(self.model, optimizer, state)
        set_optimizer_state_dict(
            self.model, optimizer, state, options=full_options(False, broadcast=True)
        )

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(
            self.model,
            cast(dict[str, Any], weights),
            options=full_options(False, strict=False, broadcast=True),
        )


def same_parameters_as_rank0(model: nn.Module) -> None:
    """The model built on the meta device must have rank 0's parameters, or FSDP2's
    collectives disagree in size. One known difference is repaired: a checkpoint that stores
    its output head although the config ties it loads untied on rank 0 (the empty model is
    tied), so the head gets its own parameter here. Anything else is an error naming it."""
    from sft_torch.model import causal_lm

    mine = [n for n, _ in model.named_parameters()]  # a tied parameter is listed once
    theirs = broadcast_object(mine, src=0)
    if rank() == 0 or theirs == mine:
        return
    head = causal_lm(model).get_output_embeddings()
    if head is not None and head.weight.is_meta and set(theirs) - set(mine):
        head.weight = nn.Parameter(
            torch.empty_like(head.weight), requires_grad=head.weight.requires_grad
        )
        mine = [n for n, _ in model.named_parameters()]
    if theirs != mine:
        raise SftError(
            "parallel.strategy: fsdp built a different model on this rank than rank 0 loaded "
            f"(only on rank 0: {sorted(set(theirs) - set(mine))[:3]}, only here: "
            f"{sorted(set(mine) - set(theirs))[:3]}); use parallel.strategy ddp and report it"
        )


def same_rng_as_rank0() -> None:
    """Every rank continues from rank 0's CPU RNG state, as when every rank loaded the model
    itself (the same seed and the same initialisation draws everywhere): building a model on
    the meta device may draw differently from loading it."""
    torch.set_rng_state(broadcast_object(torch.get_rng_state(), src=0))


def init_device_mesh(device: torch.device) -> Any:
    from torch.distributed.device_mesh import init_device_mesh as mesh

    return mesh(device.type, (world_size(),))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers (the ModuleList with num_hidden_layers entries), peft or not."""
    from sft_torch.model import causal_lm

    lm = causal_lm(model)
    n = getattr(lm.config, "num_hidden_layers", None)
    for mod in lm.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return list(mod)
    raise SftError(
        "parallel.strategy: fsdp could not find this model's decoder layers to "
        "shard; use parallel.strategy: ddp"
    )
