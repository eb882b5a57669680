"""Fine-tuning methods: which parameters train.

    model = apply_method(lm, config.method, gradient_checkpointing=False)

- full:   every parameter trains.
- lora:   peft LoRA adapters (target modules by list, regex or `all-linear`; DoRA, rsLoRA,
          modules_to_save); the base is frozen. The A matrices are core's seeded numpy draw
          (`sft.lora_init`, peft's default distribution), so the MindSpore backend starts from
          the same adapters for the same `train.seed`. With `init_adapter`, training continues
          an existing PEFT adapter (loaded trainable, its weights kept) instead.
- qlora:  the same on a bitsandbytes 4/8-bit base (loaded quantized by `sft_torch.model`).
- freeze: the last N decoder layers, modules matching `trainable_modules` and (optionally) the
          embeddings train; everything else has requires_grad=False, so backward stops at the
          lowest trainable layer.
"""

from __future__ import annotations

import re
from typing import Any, cast

from sft.errors import SftError
from sft.specs import FreezeMethod, LoraMethod, QLoraMethod
from torch import nn


def apply_method(
    lm: Any, method: Any, gradient_checkpointing: bool = False, seed: int | None = None
) -> Any:
    """`seed` (train.seed) draws the LoRA A matrices with `sft.lora_init`; None keeps peft's own
    torch-RNG draw (same distribution, not reproducible across backends)."""
    if method.name == "full":
        lm.requires_grad_(True)
        return lm
    if method.name in ("lora", "qlora"):
        model = apply_lora(lm, method, gradient_checkpointing)
        continued = isinstance(method, LoraMethod) and method.init_adapter
        if seed is not None and not continued:  # a loaded adapter keeps its own A
            init_lora_a(model, seed)
        return model
    if method.name == "freeze":
        return apply_freeze(lm, method)
    raise SftError(f"method.name: the torch backend does not know method {method.name!r}")


def lora_config(method: LoraMethod | QLoraMethod) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,  # type: ignore[arg-type]  # peft annotates int; scales by any number
        lora_dropout=method.dropout,
        # a string other than "all-linear" is a regex peft full-matches against module names
        target_modules=method.target_modules,
        use_dora=method.use_dora,
        use_rslora=method.use_rslora,
        modules_to_save=list(method.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )


def apply_lora(lm: Any, method: LoraMethod | QLoraMethod, gradient_checkpointing: bool) -> Any:
    from peft import get_peft_model, prepare_model_for_kbit_training

    if method.name == "qlora":
        lm = prepare_model_for_kbit_training(
            lm,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if isinstance(method, LoraMethod) and method.init_adapter:
        from peft import PeftModel

        # The adapter's own config (r, alpha, targets) is used; core checked that the spec
        # does not say otherwise.
        try:
            return PeftModel.from_pretrained(lm, method.init_adapter, is_trainable=True)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise SftError(
                f"method.init_adapter: {method.init_adapter} does not fit this model ({exc}); "
                "give an adapter trained on the same base model"
            ) from exc
    try:
        return get_peft_model(lm, lora_config(method))
    except ValueError as exc:
        raise SftError(
            f"method.target_modules / modules_to_save: {exc}. Module names of this model look "
            f"like: {', '.join(sample_module_names(lm))}"
        ) from exc


_LORA_A = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_A\.[^.]+\.weight$")


def init_lora_a(model: nn.Module, seed: int) -> int:
    """Overwrite every peft `lora_A` weight with `sft.lora_init.lora_a` for its module's HF name
    (B stays peft's zeros). Returns the number of matrices set."""
    import torch
    from sft.lora_init import lora_a

    n = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            m = _LORA_A.match(name)
            if m is None:
                continue
            r, in_features = param.shape
            a = lora_a(seed, m["module"], r, in_features)
            param.copy_(torch.from_numpy(a).to(dtype=param.dtype, device=param.device))
            n += 1
    return n


def sample_module_names(lm: nn.Module, limit: int = 8) -> list[str]:
    """Distinct leaf names of the model's Linear layers (q_proj, v_proj, ...), for messages."""
    names: list[str] = []
    for name, mod in lm.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, nn.Linear) and leaf not in names:
            names.append(leaf)
    return names[:limit]


def decoder_layer_prefixes(lm: nn.Module) -> list[str]:
    """Parameter-name prefixes of the decoder layers, in order ("model.layers.0.", ...): the
    ModuleList with num_hidden_layers entries."""
    n = getattr(lm.config, "num_hidden_layers", None)
    for name, mod in lm.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return [f"{name}.{i}." for i in range(len(mod))]
    raise SftError(
        "method: freeze could not find this model's decoder layers; use "
        "trainable_layers: 0 with trainable_modules patterns instead"
    )


def apply_freeze(lm: nn.Module, method: FreezeMethod) -> nn.Module:
    """requires_grad only on the chosen layers/modules; raises if a pattern matches nothing."""
    lm.requires_grad_(False)
    prefixes = decoder_layer_prefixes(lm) if method.trainable_layers else []
    chosen = tuple(prefixes[len(prefixes) - method.trainable_layers :]) if prefixes else ()
    patterns = [re.compile(p) for p in method.trainable_modules]
    hits = {p.pattern: 0 for p in patterns}
    # remove_duplicate=False: a tied head is listed under both names, so `lm_head` matches it.
    # A shared tensor trains if any of its names is chosen.
    wanted: dict[int, bool] = {}
    params = list(lm.named_parameters(remove_duplicate=False))
    for name, param in params:
        train = bool(chosen) and name.startswith(chosen)
        for p in patterns:
            if p.search(name):
                hits[p.pattern] += 1
                train = True
        wanted[id(param)] = wanted.get(id(param), False) or train
    for _, param in params:
        param.requires_grad_(wanted[id(param)])
    if method.train_embeddings:
        # a tied head shares this weight
        cast(Any, lm).get_input_embeddings().requires_grad_(True)
    missing = [p for p, n in hits.items() if n == 0]
    if missing:
        raise SftError(
            f"method.trainable_modules: {missing} match no parameter of this model; "
            f"module names look like: {', '.join(sample_module_names(lm))}"
        )
    if not any(p.requires_grad for p in lm.parameters()):
        raise SftError(
            "method: freeze leaves nothing to train; set trainable_layers > 0 or trainable_modules"
        )
    return lm


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters), shared weights counted once."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable
