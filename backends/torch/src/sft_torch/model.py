"""Loading the base model with transformers, exactly as the job spec says.

    lm = load_model(plan, device)     # AutoModelForCausalLM on `device`, safetensors only unless
                                      # model.allow_pickle, trust_remote_code only if asked
    decoder, head = split_model(lm)   # backbone (hidden states) and output head, for the loss
    enable_checkpointing(lm)          # recompute activations in backward (train.gradient_...)

The method (full / lora / qlora / freeze) is applied afterwards by `sft_torch.methods`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from sft.backend import TrainPlan
from sft.errors import SftError

from sft_torch.options import torch_options

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weights_dtype(name: str) -> torch.dtype:
    """`auto`: float32 on every device. Trained parameters are the optimizer's master weights
    and an fp32 master is what lets a small update land (bf16 keeps 8 bits: at lr 5e-5 an AdamW
    update rounds away on every weight above ~0.016); bf16/fp16 compute comes from autocast
    (`train.precision`), as in HF's Trainer. Frozen LoRA bases go to bf16 afterwards
    (`TorchOptions.bf16_frozen_weights`). An explicit bfloat16/float16 loads in that dtype."""
    return torch.float32 if name == "auto" else TORCH_DTYPES[name]


def master_weights(model: Any) -> int:
    """Store every trained fp16 parameter in fp32; returns how many elements were cast.
    GradScaler cannot unscale fp16 gradients (the first step would fail), and fp16's 10-bit
    mantissa and 6e-5 floor lose small updates. Frozen fp16 weights stay fp16 (autocast
    computes in fp16 anyway). Trained bf16 parameters exist only when `model.dtype: bfloat16`
    asks for pure-bf16 training; `sft_torch.optim` gives them a compensated AdamW."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype == torch.float16:
            p.data = p.data.float()
            cast += p.numel()
    return cast


def check_weights_precision(dtype: str, precision: str) -> None:
    """`train.precision: fp32` means fp32 weights and fp32 matmuls: explicit half-precision
    weights contradict it (a LoRA adapter on a bf16 base would not even run without autocast)."""
    if precision == "fp32" and dtype in ("bfloat16", "float16"):
        raise SftError(
            f"model.dtype: {dtype} contradicts train.precision: fp32 (torch backend): fp32 "
            "training keeps fp32 weights. Use model.dtype: auto, or train.precision: auto"
        )


def qlora_compute_dtype(precision: str) -> torch.dtype:
    """The dtype bitsandbytes dequantizes the 4-bit base to for its matmuls: the run's compute
    precision (`train.precision`), so a T4 (no native bf16) computes in fp16."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def model_class(path: str, trust_remote_code: bool = False) -> Any:
    """The transformers causal-LM class `path` loads into (None: unknown, e.g. remote code)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (OSError, ValueError, KeyError):
        return None


def attn_implementation(option: str, cls: Any = None) -> str:
    """The attention kernel for `torch.attn_implementation`. `auto`: sdpa where the model class
    has an sdpa path, else eager (Gemma2 in transformers 5.x has none: it computes soft-capped
    scores, which sdpa cannot). Both keep packed samples apart exactly: transformers builds the
    block-diagonal causal mask (sliding window included) from the restarting position ids."""
    if option != "auto":
        return option
    return "eager" if cls is not None and not getattr(cls, "_supports_sdpa", True) else "sdpa"


def check_attn_implementation(option: str, cls: Any) -> None:
    """An explicit kernel the model class does not implement is a config error, said as one
    (transformers' own message ends up suggesting unrelated load options)."""
    flags = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}
    if cls is None or option not in flags or getattr(cls, flags[option], True):
        return
    raise SftError(
        f"torch.attn_implementation: {option}: {cls.__name__} (transformers) has no {option} "
        "attention; use attn_implementation: auto (picks sdpa where the model has it, else "
        "eager) or eager"
    )


def quantization_config(plan: TrainPlan, compute_dtype: torch.dtype) -> Any:
    """bitsandbytes settings for QLoRA (NF4/FP4 4-bit or 8-bit base)."""
    from transformers import BitsAndBytesConfig

    m = plan.config.method
    if m.bits == 8:  # type: ignore[union-attr]
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=m.quant_type,  # type: ignore[union-attr]
        bnb_4bit_use_double_quant=m.double_quant,  # type: ignore[union-attr]
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_kwargs(plan: TrainPlan, device: torch.device, precision: str) -> dict[str, Any]:
    """`from_pretrained` arguments: the configured dtype, attention kernel and safety settings;
    for QLoRA the bitsandbytes config with the run's compute dtype (`precision`, resolved)."""
    cfg = plan.config
    option = torch_options(plan).attn_implementation
    cls = model_class(str(plan.model.path), cfg.model.trust_remote_code)
    check_attn_implementation(option, cls)
    kwargs: dict[str, Any] = {
        "dtype": weights_dtype(cfg.model.dtype),
        "trust_remote_code": cfg.model.trust_remote_code,
        "attn_implementation": attn_implementation(option, cls),
        # safetensors only, unless the user explicitly allows pickle files (then transformers
        # loads them with weights_only=True)
        "use_safetensors": None if cfg.model.allow_pickle else True,
    }
    if cfg.method.name == "qlora":
        kwargs["quantization_config"] = quantization_config(plan, qlora_compute_dtype(precision))
        kwargs["device_map"] = {"": device}
    return kwargs


def load_model(plan: TrainPlan, device: torch.device, precision: str = "fp32") -> Any:
    """The base causal LM from `plan.model.path`, on `device`, in the configured dtype
    (`precision`: the resolved compute precision, for QLoRA's compute dtype)."""
    from transformers import AutoModelForCausalLM

    from sft_torch.deepspeed import partitions_at_load, zero3_loading
    from sft_torch.distributed import loads_on_rank0, rank

    cfg = plan.config
    kwargs = load_kwargs(plan, device, precision)
    sharded = loads_on_rank0(cfg)  # FSDP2: rank 0 reads the weights, FSDPEngine shards them
    zero3 = partitions_at_load(cfg)  # ZeRO-3: partitioned as it is built
    loading = zero3_loading(cfg, precision) if zero3 else contextlib.nullcontext()
    try:
        if sharded and rank() != 0:
            lm = empty_model(plan, kwargs)
        else:
            with loading:
                lm = AutoModelForCausalLM.from_pretrained(str(plan.model.path), **kwargs)
    except (OSError, ValueError) as exc:
        from pathlib import Path

        path = Path(str(plan.model.path))
        pickle_only = path.is_dir() and not any(path.glob("*.safetensors*"))
        hint = (
            " The model has only .bin/.pt weights: if you trust them, set model.allow_pickle: true."
            if pickle_only and not cfg.model.allow_pickle
            else ""
        )
        raise SftError(f"cannot load the model from {plan.model.path}: {exc}.{hint}") from exc
    if cfg.method.name != "qlora" and not (sharded or zero3):  # the engines place the shards
        lm.to(device)
    lm.config.use_cache = False  # no KV cache while training
    return lm


def empty_model(plan: TrainPlan, kwargs: dict[str, Any]) -> Any:
    """The model's modules with parameters on the meta device (no memory, no file read) and
    real buffers (rotary tables are computed, not loaded); FSDPEngine fills in the shards."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        str(plan.model.path), trust_remote_code=kwargs["trust_remote_code"]
    )
    with init_empty_weights(include_buffers=False):
        lm = AutoModelForCausalLM.from_config(
            config,
            dtype=kwargs["dtype"],
            attn_implementation=kwargs["attn_implementation"],
            trust_remote_code=kwargs["trust_remote_code"],
        )
    # from_config leaves a tied head (SmolLM2, Qwen2-0.5B ...) untied; from_pretrained on rank
    # 0 ties it, and FSDP2 needs the same parameters on every rank
    lm.tie_weights()
    return lm


def causal_lm(model: Any) -> Any:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def split_model(model: Any) -> tuple[Any, Any]:
    """(decoder backbone returning hidden states, output head) of a causal LM, peft or not.
    Adapters injected by peft live inside these modules, so calling them trains them."""
    lm = causal_lm(model)
    decoder = getattr(lm, lm.base_model_prefix)
    return decoder, lm.get_output_embeddings()


def checkpointing_enabled(model: Any) -> bool:
    """Whether the transformers model recomputes activations in backward."""
    lm = causal_lm(model)
    flag = getattr(type(lm), "is_activation_checkpointing", None)  # transformers >= 5
    if flag is None:
        flag = getattr(type(lm), "is_gradient_checkpointing", None)
    return bool(flag.fget(lm)) if isinstance(flag, property) and flag.fget else False


def enable_checkpointing(lm: Any) -> None:
    """Recompute decoder-layer activations in backward. Non-reentrant: works with frozen inputs
    (LoRA) without enable_input_require_grads. (transformers 5 renamed the method.)"""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def cast_frozen_linears(model: Any, dtype: torch.dtype) -> int:
    """Store the frozen nn.Linear weights in `dtype`; returns how many parameters were cast.

    Perf (see TorchOptions.bf16_frozen_weights): under bf16 autocast every matmul casts its fp32
    weight to bf16 again (the autocast cache keeps only trainable leaves), and backward keeps
    that copy; storing the frozen base in bf16 gives the same products with half the memory.
    A head tied to the input embeddings is left alone: the embeddings feed the fp32 residual
    stream."""
    from torch import nn

    tied = causal_lm(model).get_input_embeddings().weight
    cast = 0
    for mod in model.modules():
        params = list(mod.parameters(recurse=False))
        if (
            isinstance(mod, nn.Linear)
            and mod.weight is not tied
            and not any(p.requires_grad for p in params)
        ):
            mod.to(dtype)
            cast += sum(p.numel() for p in params)
    return cast


def compile_layers(model: Any) -> int:
    """`torch.compile` every decoder layer in place (Module.compile keeps parameter names, so
    checkpoints and exports are unchanged); returns the number of layers compiled."""
    from torch import nn

    lm = causal_lm(model)
    n = getattr(lm.config, "num_hidden_layers", None)
    layers: nn.ModuleList | list[nn.Module] = next(
        (m for m in lm.modules() if isinstance(m, nn.ModuleList) and len(m) == n), []
    )
    for layer in layers:
        layer.compile()
    return len(layers)


def logits_are_plain(model: Any) -> bool:
    """Whether logits are exactly head(hidden) (no soft-capping or scaling), so the chunked loss
    over hidden states computes the same thing as the model's own forward."""
    cfg = causal_lm(model).config
    return not any(
        getattr(cfg, k, None)
        for k in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")
    )
