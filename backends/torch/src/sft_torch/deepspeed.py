"""DeepSpeed ZeRO-2 / ZeRO-3 for the torch backend: the JSON config generated from the neutral
job spec, and the engine the training loop drives (`sft_torch.engine.Engine` interface).

    $ pip install "sft-torch[deepspeed]"
    $ sft run --config cfg.yaml parallel.nproc_per_node=8 parallel.strategy=zero3 \\
          parallel.cpu_offload=true
    $ sft run --config cfg.yaml parallel.nproc_per_node=8 parallel.strategy=zero2 \\
          parallel.deepspeed_config=my_ds.json          # your own JSON ("auto" values filled)

    ds_config(config, accumulation=4, world=8, precision="bf16")   # the JSON, as a dict

The spec stays the single source of truth: micro batch, accumulation, global batch, clipping
and precision always come from it. In your own JSON, leave those keys out or set them to
"auto"; a different value is an error rather than a silent change of the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from sft.errors import SftError
from sft.specs import RunConfig
from torch import nn

from sft_torch.distributed import env_world_size, world_size
from sft_torch.engine import Engine, ForwardRoot, swap_parameters


def ds_config(config: RunConfig, accumulation: int, world: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON for `parallel.strategy` zero2 / zero3, or the user's own file with
    the spec's values filled in."""
    par = config.parallel
    ours = spec_values(config, accumulation, world, precision)
    if par.deepspeed_config:
        return merge_user_config(read_json(par.deepspeed_config), ours)
    stage = 3 if par.strategy == "zero3" else 2
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if par.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        # whole 16-bit weights on save, so RUN/final/model holds a normal model
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        **ours,
        "zero_optimization": zero,
        # the loop's AdamW (no weight decay on biases/norms) is the optimizer ZeRO partitions
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # sft logs metrics itself
    }


def spec_values(config: RunConfig, accumulation: int, world: int, precision: str) -> dict[str, Any]:
    tr = config.train
    return {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": tr.micro_batch_size * accumulation * world,
        "gradient_clipping": tr.max_grad_norm or 0.0,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    }


def read_json(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SftError(f"parallel.deepspeed_config: {path} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise SftError(
            f"parallel.deepspeed_config: {path} is not valid JSON (line {exc.lineno}: {exc.msg})"
        ) from exc
    if not isinstance(data, dict):
        raise SftError(f"parallel.deepspeed_config: {path} must hold a JSON object")
    return data


def merge_user_config(user: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """The user's JSON with the spec's values where it says "auto" or nothing; a conflicting
    value is an error naming both."""
    out = dict(user)
    conflicts = []
    for key, value in ours.items():
        if isinstance(value, dict):
            mine = dict(out.get(key) or {})
            if mine.get("enabled", "auto") not in ("auto", value["enabled"]):
                conflicts.append(f"{key}.enabled={mine['enabled']} (spec: {value['enabled']})")
            out[key] = {
                **value,
                **{k: v for k, v in mine.items() if k != "enabled"},
                "enabled": value["enabled"],
            }
        elif out.get(key, "auto") == "auto":
            out[key] = value
        elif out[key] != value:
            conflicts.append(f"{key}={out[key]} (spec: {value})")
    if conflicts:
        raise SftError(
            "parallel.deepspeed_config: these values differ from the job spec: "
            + "; ".join(conflicts)
            + '. Set them to "auto" (or remove them) and change '
            "train.* / parallel.* in the spec instead"
        )
    if "zero_optimization" not in out:
        raise SftError("parallel.deepspeed_config: the JSON has no zero_optimization section")
    return out


class DeepSpeedEngine(Engine):
    """The loop's micro-batches go through `deepspeed.initialize`'s engine: backward per
    micro-batch with the accumulation boundary set by the loop, one `step()` per optimizer step
    (ZeRO reduces, clips per `gradient_clipping` and updates the partitioned fp32 weights)."""

    owns_loss_scaling = True  # fp16 loss scaling is DeepSpeed's, not torch.amp's

    def __init__(self, model: nn.Module, config: dict[str, Any], strategy: str) -> None:
        super().__init__(model)
        self.strategy, self.config, self.ds = strategy, config, None
        self.root = ForwardRoot(model)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Build the DeepSpeed engine around the loop's optimizer (its LR schedule keeps
        driving the param groups, which ZeRO shares)."""
        use_own_extensions_dir()
        import deepspeed

        self.ds, _, _, _ = deepspeed.initialize(
            model=self.root, optimizer=optimizer, config=self.config, dist_init_required=False
        )

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.engine()(fn, *args, **kwargs)

    def evaluate(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.engine()(fn, *args, **kwargs)

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        self.engine().set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine().backward(loss, scale_wrt_gas=False)  # already the global token mean

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """DeepSpeed reduces, clips (per `gradient_clipping`) and updates in one `step()`, so
        the update happens here and the norm it measured is returned: the NaN policy can
        stop after such a step but not skip it (see `wrap`)."""
        ds = self.engine()
        ds.step()
        norm = ds.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def optimizer_step(self, scaler: Any, optimizer: torch.optim.Optimizer) -> None:
        """Nothing left to do: `clip_grad_norm` already stepped."""

    def engine(self) -> Any:
        if self.ds is None:
            raise RuntimeError("DeepSpeedEngine used before attach_optimizer()")
        return self.ds

    # checkpoints: DeepSpeed's own (`save_checkpoint`: each rank writes its partition of the
    # weights and optimizer state) inside sft's atomic checkpoint directory, under "deepspeed/"
    checkpoint_format = "deepspeed"
    NATIVE_TAG = "state"

    def save_native(self, path: Path) -> None:
        """Every rank: DeepSpeed's checkpoint of the engine (weights, ZeRO optimizer partitions)
        into `path`, a directory every rank sees; a collective."""
        self.engine().save_checkpoint(str(path), tag=self.NATIVE_TAG, save_latest=False)

    def load_native(self, path: Path) -> None:
        """Every rank: restore the engine from `save_native`'s directory. sft's LR schedule is
        restored by the caller (it drives the param groups; DeepSpeed has none of its own)."""
        loaded, _ = self.engine().load_checkpoint(
            str(path),
            tag=self.NATIVE_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if loaded is None:
            raise SftError(f"checkpoint.resume: DeepSpeed found no checkpoint in {path}")

    def check_resume(self, saved: dict[str, Any], ckpt: Any) -> None:
        """A ZeRO checkpoint holds per-rank partitions: it resumes with the same strategy and
        world size only, and this engine resumes nothing else."""
        want = {"format": "deepspeed", "strategy": self.strategy, "world_size": world_size()}
        have = {k: saved.get(k) for k in want}
        if have != want:
            raise SftError(
                f"checkpoint.resume: {ckpt} was written by strategy {have['strategy']} on "
                f"{have['world_size']} processes ({have['format']} format); parallel.strategy "
                f"{self.strategy} resumes only its own checkpoints at the same world size "
                f"({want['world_size']}). Resume with parallel.strategy={have['strategy']} "
                f"parallel.nproc_per_node/nnodes giving {have['world_size']} processes"
            )

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """ZeRO-3 partitions the parameters: every rank enters (a collective), DeepSpeed gathers
        them to rank 0 one module at a time and moves each to rank 0's CPU memory
        (`_zero3_consolidated_16bit_state_dict`, what its `save_16bit_model` uses), and on rank
        0 the model's parameters are those whole CPU tensors inside the context. (Gathering
        every parameter on every rank at once needed the whole model on each GPU.)"""
        if self.config["zero_optimization"].get("stage") != 3:
            yield
            return
        full = self.engine()._zero3_consolidated_16bit_state_dict()  # None unless rank 0
        if full is None:
            yield
            return
        prefix = "model."  # the engine's module is ForwardRoot(model)
        originals = swap_parameters(
            self.model, {k.removeprefix(prefix): v for k, v in full.items()}
        )
        try:
            yield
        finally:
            for mod, name, param in originals:
                mod._parameters[name] = param


def wrap(
    model: nn.Module, config: RunConfig, accumulation: int, world: int, precision: str
) -> DeepSpeedEngine:
    """The engine for zero2 / zero3 (`sft_torch.strategy` has checked what it cannot do)."""
    return DeepSpeedEngine(
        model, ds_config(config, accumulation, world, precision), config.parallel.strategy
    )


def partitions_at_load(config: RunConfig) -> bool:
    """Whether the model is built partitioned (`zero3_loading`): ZeRO-3 with several processes."""
    return (
        env_world_size() > 1
        and config.parallel.strategy == "zero3"
        and config.method.name != "qlora"
    )


@contextlib.contextmanager
def zero3_loading(config: RunConfig, precision: str) -> Iterator[None]:
    """While open, transformers' `from_pretrained` builds the model inside
    `deepspeed.zero.Init` (it sees this run's DeepSpeed config through `HfDeepSpeedConfig`):
    every parameter is partitioned over the ranks as it is created, and rank 0's values from
    the file are copied in one module at a time, so no rank holds the whole model. Closed
    right after loading, so later loads in the process (export, eval) are ordinary."""
    from transformers.integrations import HfDeepSpeedConfig

    use_own_extensions_dir()
    import deepspeed

    # zero.Init reads the world size from DeepSpeed's communicator: wrap the process group
    # torch already has (deepspeed.initialize would do it later)
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    world = world_size()
    hf = HfDeepSpeedConfig(ds_config(config, config.train.accumulation(world), world, precision))
    try:
        yield
    finally:
        del hf  # transformers holds it through a weak reference only


def use_own_extensions_dir() -> None:
    """DeepSpeed JIT-compiles a CPU allreduce op into TORCH_EXTENSIONS_DIR (default: one dir
    in the home directory). Unless you chose a dir, keep it inside this environment, so two
    environments sharing a home do not rebuild (minutes) each other's copy."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")


def prebuild_ops() -> None:
    """Compile DeepSpeed's CPU allreduce op now (the Makefile does, so no test pays for it):
    `python -c "from sft_torch.deepspeed import prebuild_ops; prebuild_ops()"`."""
    use_own_extensions_dir()
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()
