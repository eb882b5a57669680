"""The job spec translated into a MindFormers legacy finetune YAML (written to RUN_DIR/mindformers.yaml).

The YAML is complete and standalone: users can inspect it, or rerun it with MindFormers directly
(`python run_mindformer.py --config RUN_DIR/mindformers.yaml` on Ascend, or sft's own entry
script: `python -m sft_mindspore.worker --config RUN_DIR/mindformers.yaml`).

    from sft_mindspore.mfconfig import build_yaml
    doc = build_yaml(plan, schedule, ckpt_path, dataset_path, device="CPU")

What maps to what (spec -> MindFormers):
    model config.json          -> model.model_config (LlamaConfig; qwen2 = qkv_has_bias: True)
    method lora r/alpha/...    -> model_config.pet_config (mindpet LoRA; q_proj -> wq ... regex)
    train.* optimizer/schedule -> optimizer (AdamW), lr_schedule (sft_mindspore.lr), runner_wrapper
    micro batch x accumulation -> runner_config (batch_size per card, gradient_accumulation_steps)
    parallel.*                 -> parallel_config (dp x mp x cp x pp must equal the device count)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from sft.errors import ConfigError, Problem, SftError
from sft.lr import warmup_steps

from sft_mindspore.cpu_compat import cpu_model_config
from sft_mindspore.weights import MODULE_MAP, lora_target_names

ALL_LINEAR = list(MODULE_MAP.values())
# Far above any real gradient norm: clipping then changes nothing, but MindFormers still
# computes and logs the norm (it does only when use_clip_grad is on), as torch logs it always.
NO_CLIP = 1e30


def parallel_degrees(config: Any) -> dict[str, int]:
    """dp, mp, cp, pp from `parallel`; dp is what remains of the device count. Raises a
    ConfigError when the product does not equal the device count."""
    p = config.parallel
    world = p.world_size
    mp, cp, pp = p.tensor_parallel, p.context_parallel, p.pipeline_parallel
    if world % (mp * cp * pp):
        raise ConfigError(
            [
                Problem(
                    "parallel",
                    f"tensor_parallel {mp} x context_parallel {cp} x pipeline_parallel {pp} = "
                    f"{mp * cp * pp} does not divide the device count {world} (nproc_per_node "
                    f"{p.nproc_per_node} x nnodes {p.nnodes}); MindFormers needs data x model x "
                    f"context x pipeline = devices: choose degrees whose product divides {world}",
                )
            ]
        )
    return {"dp": world // (mp * cp * pp), "mp": mp, "cp": cp, "pp": pp}


def lora_targets(target_modules: str | list[str]) -> str:
    """The spec's LoRA targets as mindpet's regex over cell names (q_proj -> wq ...)."""
    return "|".join(f".*{MODULE_MAP[n]}$" for n in lora_target_names(target_modules))


def model_config(hf: dict[str, Any], seq_length: int, device: str, batch_size: int) -> dict:
    """LlamaConfig keys from an HF config.json (llama or qwen2)."""
    rope = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    mc: dict[str, Any] = {
        "type": "LlamaConfig",
        "batch_size": batch_size,
        "seq_length": seq_length,
        "hidden_size": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": hf["num_attention_heads"],
        "n_kv_heads": hf.get("num_key_value_heads", hf["num_attention_heads"]),
        "vocab_size": hf["vocab_size"],
        "intermediate_size": hf["intermediate_size"],
        "max_position_embedding": hf.get("max_position_embeddings", seq_length),
        "rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
        "theta": float(theta),
        "qkv_has_bias": hf["model_type"] == "qwen2" or bool(hf.get("attention_bias")),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        # -1 matches no token: sft's labels already mask padding, and a real id here would
        # also mask (and hide from attention) every genuine occurrence of it (pad == eos).
        "pad_token_id": -1,
        "ignore_token_id": -100,
        "compute_dtype": "bfloat16",
        "layernorm_compute_type": "float32",
        "softmax_compute_type": "float32",
        "rotary_dtype": "float32",
        "param_init_type": "float32",
        "use_past": False,
        "use_flash_attention": device != "CPU",
        "offset": 0,
        "checkpoint_name_or_path": "",
    }
    mc.update(rope_extension(hf))
    if device == "CPU":
        mc.update(cpu_model_config())
    return mc


def rope_extension(hf: dict[str, Any]) -> dict[str, Any]:
    """HF rope scaling (llama3, linear) -> MindFormers' extend_method / scaling_factor."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {}
    if kind == "llama3":
        keys = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")
        factor = {k: rope[k] for k in keys}
        factor["factor"] = float(factor["factor"])
        return {"extend_method": "LLAMA3", "scaling_factor": factor}
    if kind == "linear":
        return {"extend_method": "LINEAR", "scaling_factor": {"factor": float(rope["factor"])}}
    raise SftError(
        f"model: rope scaling {kind!r} has no MindFormers legacy llama counterpart (llama3 and "
        "linear do); use --backend torch for this model"
    )


def lr_schedule(train: Any, total_steps: int) -> dict[str, Any]:
    """sft's own schedule class (`sft_mindspore.lr`): MindFormers' built-ins start warmup at lr 0
    and decay on a different step count, so they cannot train the torch backend's lrs."""
    return {
        "type": "SftWarmUpDecayLR",
        "learning_rate": train.learning_rate,
        "total_steps": total_steps,
        "warmup_steps": warmup_steps(train, total_steps),
        "kind": train.lr_scheduler,
        "min_lr_ratio": train.min_lr_ratio,
    }


def batch_layout(config: Any, device: str, dp: int) -> tuple[int, int]:
    """(runner_config.batch_size per card, gradient_accumulation_steps). On CPU the accumulation
    is folded into the batch (MindFormers accumulates only under semi-auto parallel on Ascend);
    the loss of a step is then one token-mean over the rank's whole share of the global batch."""
    world = config.parallel.world_size
    accum = config.train.accumulation(world)
    per_card = config.train.micro_batch_size * (world // dp)
    if device == "CPU":
        return per_card * accum, 1
    return per_card, accum


def build_yaml(
    plan: Any,
    schedule: Any,
    load_checkpoint: str,
    dataset: str,
    device: str,
    output_dir: str,
    settings: Any = None,
) -> dict[str, Any]:
    """The whole MindFormers YAML as a dict. `settings` (`runtime.resolve`, with the detected
    device) decides precision, memory, JIT, recompute, optimizer sharding and the pipeline
    micro-batches; without it they are resolved from the options alone."""
    doc = _build_yaml(plan, schedule, load_checkpoint, dataset, device, output_dir)
    # device settings (sft_mindspore.runtime): precision, memory, jit, recompute, pipeline
    from sft_mindspore import runtime

    settings = settings or runtime.resolve(plan.config, plan.options, device)
    runtime.apply(doc, settings, plan.config)
    return doc


def _build_yaml(
    plan: Any, schedule: Any, load_checkpoint: str, dataset: str, device: str, output_dir: str
) -> dict[str, Any]:
    cfg = plan.config
    deg = parallel_degrees(cfg)
    batch, accum = batch_layout(cfg, device, deg["dp"])
    mc = model_config(plan.model.config, schedule.seq_length, device, batch)
    if cfg.method.name == "lora":
        mc["pet_config"] = pet_config(cfg.method)
    steps = len(schedule.steps)
    return {
        "seed": cfg.train.seed,
        "run_mode": "finetune",
        "use_legacy": True,
        "output_dir": output_dir,
        "load_checkpoint": load_checkpoint,
        "load_ckpt_format": "ckpt",
        "auto_trans_ckpt": False,
        "resume_training": False,
        "only_save_strategy": False,
        "use_parallel": cfg.parallel.world_size > 1,
        # sum of token losses / trained tokens of all accumulated micro-batches, as torch
        # normalises a step; without it MindFormers averages the micro-batches' own means
        "calculate_per_token_loss": True,
        "trainer": {"type": "CausalLanguageModelingTrainer", "model_name": "llama"},
        "context": _context(device, cfg.train),
        **_parallel(device, deg, output_dir),
        "runner_config": {
            "epochs": 1,
            "batch_size": batch,
            "sink_mode": False,
            "sink_size": 1,
            "gradient_accumulation_steps": accum,
        },
        **_optimization(cfg.train, steps),
        "train_dataset": _dataset(dataset, batch),
        "train_dataset_task": {
            "type": "CausalLanguageModelDataset",
            "dataset_config": _dataset(dataset, batch),
        },
        "do_eval": False,
        "callbacks": _callbacks(cfg.checkpoint, steps, cfg.logging.every_steps),
        "model": {"model_config": mc, "arch": {"type": "LlamaForCausalLM"}},
        "profile": False,
    }


def pet_config(method: Any) -> dict[str, Any]:
    """LoRA -> mindpet's pet_config (alpha kept an int when it is one, as MindFormers writes it)."""
    alpha = int(method.alpha) if float(method.alpha).is_integer() else method.alpha
    return {
        "pet_type": "lora",
        "lora_rank": method.r,
        "lora_alpha": alpha,
        "lora_dropout": method.dropout,
        "target_modules": lora_targets(method.target_modules),
    }


def _parallel(device: str, deg: dict[str, int], output_dir: str) -> dict[str, Any]:
    # Semi-auto parallel (mode 1) is what MindFormers recommends on Ascend; CPU runs plain
    # data parallel (mode 0), where each rank reads its own shard of the MindRecord.
    return {
        "parallel": {
            "parallel_mode": 1 if device != "CPU" else 0,
            "gradients_mean": True,
            "enable_alltoall": False,
            "full_batch": device != "CPU",
            "search_mode": "sharding_propagation",
            "enable_parallel_optimizer": False,
            "strategy_ckpt_save_file": f"{output_dir}/strategy/ckpt_strategy.ckpt",
        },
        "parallel_config": {
            "data_parallel": deg["dp"],
            "model_parallel": deg["mp"],
            "context_parallel": deg["cp"],
            "pipeline_stage": deg["pp"],
            "use_seq_parallel": False,
            "micro_batch_num": max(1, deg["pp"]),
            "vocab_emb_dp": True,
            "gradient_aggregation_group": 4,
        },
        "micro_batch_interleave_num": 1,
    }


def _optimization(t: Any, steps: int) -> dict[str, Any]:
    return {
        "runner_wrapper": {
            "type": "MFTrainOneStepCell",
            "scale_sense": 1.0,
            "use_clip_grad": True,
            "max_grad_norm": t.max_grad_norm or NO_CLIP,
        },
        "optimizer": {
            "type": "AdamW",
            "betas": list(t.betas),
            "eps": t.eps,
            "weight_decay": t.weight_decay,
        },
        "lr_schedule": lr_schedule(t, steps),
    }


def _callbacks(checkpoint: Any, steps: int, log_every: int = 1) -> list[dict[str, Any]]:
    return [
        {"type": "MFLossMonitor", "per_print_times": log_every},
        {
            "type": "CheckpointMonitor",
            "prefix": "sft",
            "save_checkpoint_steps": checkpoint.every_steps or steps,
            "keep_checkpoint_max": checkpoint.keep_last,
            "integrated_save": False,
            "async_save": False,
            "checkpoint_format": "ckpt",
        },
    ]


def _context(device: str, t: Any) -> dict[str, Any]:
    ctx: dict[str, Any] = {
        "mode": 0,
        "device_target": device,
        "max_call_depth": 10000,
        "save_graphs": False,
        "deterministic": "ON" if t.deterministic else "OFF",
    }
    # No device_id: MindFormers then takes DEVICE_ID (rank table) or msrun's. Memory, jit and
    # memory_optimize_level: sft_mindspore.runtime.
    return ctx


def _dataset(path: str, batch: int) -> dict[str, Any]:
    return {
        "data_loader": {"type": "MindDataset", "dataset_dir": path, "shuffle": False},
        "input_columns": ["input_ids", "labels"],
        "construct_args_key": ["input_ids", "labels"],
        "num_parallel_workers": 1,
        "python_multiprocessing": False,
        "drop_remainder": True,
        "batch_size": batch,
        "repeat": 1,
        "numa_enable": False,
        "prefetch_size": 1,
    }


def write_yaml(doc: dict[str, Any], path: str | Path, header: str) -> Path:
    path = Path(path)
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return path
