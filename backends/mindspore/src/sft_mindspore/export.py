"""Exports of the MindSpore backend: a trained MindFormers ckpt back to HF / PEFT, and the `ckpt` format.

After training (`export_final`), RUN_DIR/final holds, in separate directories:

    final/model/      merged HF safetensors (W + alpha/r * B @ A for LoRA) + config + tokenizer
    final/adapter/    PEFT adapter (adapter_config.json + adapter_model.safetensors), LoRA only
    final/mindspore/  model.ckpt: the trained weights with MindFormers names (no optimizer state)

The `ckpt` exporter turns any run (either backend) or a plain HF directory into a MindSpore
checkpoint and verifies it by reading it back with `mindspore.load_checkpoint`:

    $ sft export runs/smollm2-135m-lora --format ckpt --dtype f32
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from sft.errors import SftError
from sft.rundir import (
    FINAL_ADAPTER,
    FINAL_MODEL,
    config_path,
    final_dir,
    find_final_weights,
    is_model_dir,
)
from sft.safetensors_io import Tensor, read_dir, read_file, write_file

from sft_mindspore.weights import (
    MODULE_MAP,
    copy_model_files,
    hf_to_ms_name,
    load_ckpt,
    ms_to_hf_name,
    save_ckpt,
)

_HF_MODULES = {v: k for k, v in MODULE_MAP.items()}
_LORA = re.compile(r"^(.*)\.mindpet_delta_lora_([ab])$")


def final_checkpoint(output_dir: Path, rank: int = 0) -> Path:
    """The checkpoint MindFormers saved last for this rank: meta.json's `last_ckpt_file` (a
    resumed run saves under another prefix, e.g. `sft_rank_0_1-1_3.ckpt`), else the newest."""
    rank_dir = output_dir / "checkpoint" / f"rank_{rank}"
    meta = rank_dir / "meta.json"
    if meta.is_file():
        last = rank_dir / json.loads(meta.read_text()).get("last_ckpt_file", "")
        if last.is_file():
            return last
    found = list(rank_dir.glob("*.ckpt"))
    if not found:
        raise SftError(
            f"MindFormers saved no checkpoint under {rank_dir}; see the worker log in "
            f"{output_dir.parent}"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def split_lora(
    tensors: dict[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """(base weights, {cell: {"a": A (r, in), "b": B (out, r)}}) from MindFormers names."""
    base: dict[str, Tensor] = {}
    lora: dict[str, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        m = _LORA.match(name)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = t
        else:
            base[name] = t
    return base, lora


def cast_like(values: np.ndarray, like: Tensor) -> Tensor:
    """float32 values in `like`'s dtype (bf16 rounded to nearest even)."""
    if like.dtype == "BF16":
        bits = values.astype(np.float32).view(np.uint32)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        return Tensor((rounded >> 16).astype(np.uint16), "BF16")
    return Tensor(values.astype(like.data.dtype), like.dtype)


def merge_lora(
    base: dict[str, Tensor], lora: dict[str, dict[str, Tensor]], scale: float
) -> dict[str, Tensor]:
    """W + scale * B @ A for every adapted cell (MindFormers names in and out)."""
    merged = dict(base)
    for cell, ab in lora.items():
        w = base[cell + ".weight"]
        delta = ab["b"].to_float32() @ ab["a"].to_float32()
        merged[cell + ".weight"] = cast_like(w.to_float32() + scale * delta, w)
    return merged


def peft_adapter(lora: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """mindpet tensors under PEFT's names (base_model.model.<hf module>.lora_A/B.weight)."""
    out = {}
    for cell, ab in lora.items():
        module = ms_to_hf_name(cell + ".weight")[: -len(".weight")]
        out[f"base_model.model.{module}.lora_A.weight"] = ab["a"]
        out[f"base_model.model.{module}.lora_B.weight"] = ab["b"]
    return out


def adapter_config(method: Any, lora: dict[str, dict[str, Tensor]], base_path: str) -> dict:
    modules = sorted({_HF_MODULES[cell.rsplit(".", 1)[-1]] for cell in lora})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        "r": method.r,
        "lora_alpha": method.alpha,
        "lora_dropout": method.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }


def write_generation_config(out: Path, model_dir: Path, eos_ids: list[int], pad_id: int) -> None:
    src = model_dir / "generation_config.json"
    gen = json.loads(src.read_text()) if src.exists() else {}
    if eos_ids:
        gen["eos_token_id"] = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    gen["pad_token_id"] = pad_id
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _model_files(out: Path, plan: Any) -> None:
    """config.json from the base model; tokenizer (with the chat template used) from the data."""
    out.mkdir(parents=True, exist_ok=True)
    copy_model_files(plan.data.tokenizer_dir, out)
    (out / "config.json").write_text((plan.model.path / "config.json").read_text())
    write_generation_config(out, plan.model.path, plan.data.eos_ids, plan.data.pad_id)


def full_checkpoint(plan: Any, output_dir: Path) -> Path:
    """The run's trained weights as one unsharded checkpoint.

    Data parallel only: every rank holds all weights, rank 0's checkpoint is the model. With
    tensor, pipeline or context parallelism each rank holds a shard: all ranks' checkpoints are
    merged by `mindspore.transform_checkpoints` with the strategy files MindFormers wrote
    (output/strategy/ckpt_strategy_rank_R.ckpt; merged first with `merge_pipeline_strategys`).
    When that cannot be done this raises SftError and no final model is written: a shard is
    never exported as a model."""
    p = plan.config.parallel
    if p.tensor_parallel * p.pipeline_parallel * p.context_parallel == 1:
        return final_checkpoint(output_dir)
    layout = (
        f"tensor_parallel {p.tensor_parallel} x pipeline_parallel {p.pipeline_parallel} x "
        f"context_parallel {p.context_parallel}"
    )
    strategies = sorted((output_dir / "strategy").glob("*.ckpt"))
    ranks = [output_dir / "checkpoint" / f"rank_{r}" for r in range(p.world_size)]
    missing = [r.name for r in ranks if not list(r.glob("*.ckpt"))]
    why = None
    if not strategies:
        why = f"no parallel strategy files in {output_dir / 'strategy'}"
    elif missing:
        why = (
            f"checkpoints of {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} are "
            f"not under {output_dir / 'checkpoint'} (each node saves its own ranks: put the "
            "run directory on a filesystem all nodes share)"
        )
    if why is None:
        try:
            return _transform(output_dir, ranks, strategies)
        except Exception as exc:  # MindSpore's own message says what is wrong with the files
            why = f"mindspore.transform_checkpoints failed: {type(exc).__name__}: {exc}"
    raise SftError(
        f"training finished, but the final model was NOT written: with {layout} every rank "
        f"holds only a shard, and merging them failed: {why}. The sharded checkpoints are in "
        f"{output_dir / 'checkpoint'}; merge them with mindspore.transform_checkpoints (strategy "
        "files from output/strategy), then `sft convert weights --to hf`"
    )


def _transform(output_dir: Path, ranks: list[Path], strategies: list[Path]) -> Path:
    import mindspore as ms

    work = output_dir / "merged"
    if work.exists():
        shutil.rmtree(work)
    strategy = work / "strategy.ckpt"
    strategy.parent.mkdir(parents=True)
    if len(strategies) > 1:  # one file per rank (pipeline stages differ): merge them first
        ms.merge_pipeline_strategys(str(strategies[0].parent), str(strategy))
    else:
        shutil.copy(strategies[0], strategy)
    src = work / "src"
    for r, rank_dir in enumerate(ranks):  # exactly each rank's last checkpoint
        (src / rank_dir.name).mkdir(parents=True)
        last = final_checkpoint(output_dir, r)
        (src / rank_dir.name / last.name).symlink_to(last)
    ms.transform_checkpoints(str(src), str(work / "full"), "full", str(strategy), None)
    found = sorted((work / "full" / "rank_0").glob("*.ckpt"))
    if not found:
        raise SftError(f"no merged checkpoint under {work / 'full' / 'rank_0'}")
    return found[0]


def export_final(plan: Any, output_dir: Path) -> dict[str, str]:
    """Trained ckpt -> final/model (merged HF), final/adapter (PEFT), final/mindspore."""
    final = final_dir(plan.run_dir)
    if final.exists():  # an older run's model must not survive a refused export either
        shutil.rmtree(final)
    ckpt = full_checkpoint(plan, output_dir)
    base, lora = split_lora(load_ckpt(ckpt))
    outputs = {}
    native = save_ckpt(
        {
            **base,
            **{f"{c}.mindpet_delta_lora_{k}": t for c, ab in lora.items() for k, t in ab.items()},
        },
        final / "mindspore" / "model.ckpt",
    )
    outputs["ckpt"] = str(native)
    scale = plan.config.method.alpha / plan.config.method.r if lora else 0.0
    merged = merge_lora(base, lora, scale) if lora else base
    _model_files(final / FINAL_MODEL, plan)
    write_file(
        {ms_to_hf_name(k): v for k, v in merged.items()}, final / FINAL_MODEL / "model.safetensors"
    )
    outputs["model"] = str(final / FINAL_MODEL)
    if lora:
        adir = final / FINAL_ADAPTER
        _model_files(adir, plan)
        (adir / "config.json").unlink()  # an adapter dir holds no base config
        write_file(peft_adapter(lora), adir / "adapter_model.safetensors")
        cfg = adapter_config(plan.config.method, lora, str(plan.model.path))
        (adir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        outputs["adapter"] = str(adir)
    (final / "mindspore" / "export.json").write_text(
        json.dumps(
            {"from": str(ckpt), "lora_cells": len(lora), "scale": scale, **outputs}, indent=2
        )
    )
    return outputs


# ------------------------------------------------------------------ `sft export --format ckpt`

_DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}


def _base_of_adapter(adapter_dir: Path, run_dir: Path) -> Path:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = Path(cfg.get("base_model_name_or_path") or "")
    if (base / "config.json").is_file():
        return base
    run_cfg = config_path(run_dir)
    if run_cfg.exists():
        import yaml
        from sft.models import resolve_model

        spec = yaml.safe_load(run_cfg.read_text())["model"]["name_or_path"]
        return resolve_model(spec).path
    raise SftError(
        f"{adapter_dir}: cannot find the base model of this adapter "
        f"({cfg.get('base_model_name_or_path')!r} is not a local directory)"
    )


def locate_weights(run_dir: Path) -> tuple[Path, Path | None]:
    """(HF model dir, adapter dir or None) of a run directory or a plain HF directory; a run's
    full model wins over its adapter."""
    found = find_final_weights(run_dir)
    if found and found.model:
        return found.model, None
    if is_model_dir(run_dir):
        return run_dir, None
    if found and found.adapter:
        return _base_of_adapter(found.adapter, run_dir), found.adapter
    raise SftError(
        f"{run_dir}: no HF model (config.json + *.safetensors) or PEFT adapter "
        "(adapter_config.json) in it or in its final/ directory"
    )


def merge_peft(weights: dict[str, Tensor], adapter_dir: Path) -> dict[str, Tensor]:
    """W + (alpha/r) B @ A with numpy from a PEFT adapter's safetensors (HF names in and out)."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("use_dora"):
        raise SftError(f"{adapter_dir}: DoRA adapters cannot be merged into a ckpt here")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / np.sqrt(r) if cfg.get("use_rslora") else alpha / r
    ad = read_file(adapter_dir / "adapter_model.safetensors")
    merged = dict(weights)
    for key, a in ad.items():
        m = re.match(r"^base_model\.model\.(.*)\.lora_A(?:\.default)?\.weight$", key)
        if not m:
            continue
        module = m.group(1)
        b = ad[key.replace("lora_A", "lora_B")]
        w = weights[module + ".weight"]
        merged[module + ".weight"] = cast_like(
            w.to_float32() + scale * (b.to_float32() @ a.to_float32()), w
        )
    return merged


def to_dtype(t: Tensor, dtype: str) -> Tensor:
    if t.dtype not in ("F32", "F16", "BF16") or t.dtype == dtype:
        return t
    values = t.to_float32()
    if dtype == "BF16":
        return cast_like(values, Tensor(np.zeros(0, np.uint16), "BF16"))
    return Tensor(values.astype(np.float16 if dtype == "F16" else np.float32), dtype)


def export_ckpt(request: Any) -> Any:
    """The `ckpt` exporter: HF (or HF + merged adapter) -> MindSpore ckpt, verified tensor by
    tensor after reading it back with mindspore.load_checkpoint."""
    from sft.export import ExportReport

    if request.dtype not in _DTYPES:
        raise SftError(f"--dtype {request.dtype}: a MindSpore ckpt export takes {list(_DTYPES)}")
    model_dir, adapter = locate_weights(Path(request.run_dir))
    weights = read_dir(model_dir)
    if adapter is not None:
        weights = merge_peft(weights, adapter)
    expected = {hf_to_ms_name(k): to_dtype(v, _DTYPES[request.dtype]) for k, v in weights.items()}
    path = save_ckpt(expected, Path(request.out) / "model.ckpt")
    back = load_ckpt(path)
    mismatched = [
        k
        for k, t in expected.items()
        if k not in back or back[k].dtype != t.dtype or not np.array_equal(back[k].data, t.data)
    ]
    copy_model_files(model_dir, request.out)
    return ExportReport(
        format="ckpt",
        path=str(path),
        ok=not mismatched and len(back) == len(expected),
        checks={
            "tensors_compared": len(expected),
            "tensors_read_back": len(back),
            "mismatched": mismatched[:10],
            "bit_exact": not mismatched,
            "source": str(model_dir),
            "adapter_merged": str(adapter or ""),
            "dtype": request.dtype,
        },
    )


# --------------------------------------------- `sft export --format hf | adapter` without torch


def export_hf(request: Any) -> Any:
    """The `hf` exporter of the MindSpore environment (which has no torch): the run's merged
    model (final/model, or HF + PEFT adapter merged with numpy) as HF safetensors in
    `request.dtype`, with config and tokenizer; verified by reading every tensor back."""
    from sft.export import ExportReport

    if request.dtype not in _DTYPES:
        raise SftError(f"--dtype {request.dtype}: an hf export takes {list(_DTYPES)}")
    model_dir, adapter = locate_weights(Path(request.run_dir))
    weights = read_dir(model_dir)
    if adapter is not None:
        weights = merge_peft(weights, adapter)
    expected = {k: to_dtype(v, _DTYPES[request.dtype]) for k, v in weights.items()}
    out = Path(request.out)
    out.mkdir(parents=True, exist_ok=True)
    copy_model_files(model_dir, out)
    (out / "config.json").write_text((model_dir / "config.json").read_text())
    path = out / "model.safetensors"
    write_file(expected, path)
    mismatched = _compare(expected, read_file(path))
    return ExportReport(
        format="hf",
        path=str(out),
        ok=not mismatched,
        checks={
            "tensors_compared": len(expected),
            "mismatched": mismatched[:10],
            "bit_exact": not mismatched,
            "source": str(model_dir),
            "adapter_merged": str(adapter or ""),
            "dtype": request.dtype,
            "verified_with": "safetensors read back tensor by tensor (numpy; no torch here)",
        },
    )


def export_adapter(request: Any) -> Any:
    """The `adapter` exporter of the MindSpore environment: the run's PEFT adapter
    (final/adapter) copied as trained, verified tensor by tensor."""
    from sft.export import ExportReport

    found = find_final_weights(request.run_dir)
    if found is None or found.adapter is None:
        raise SftError(f"{request.run_dir}: no PEFT adapter in final/adapter (a LoRA run has one)")
    src = found.adapter
    out = Path(request.out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    name = "adapter_model.safetensors"
    mismatched = _compare(read_file(src / name), read_file(out / name))
    return ExportReport(
        format="adapter",
        path=str(out),
        ok=not mismatched,
        checks={"source": str(src), "dtype": "as trained", "mismatched": mismatched[:10]},
    )


def _compare(expected: dict[str, Tensor], back: dict[str, Tensor]) -> list[str]:
    """Names whose tensor differs (dtype, shape or bits) or is missing after a read-back."""
    bad = [
        k
        for k, t in expected.items()
        if k not in back or back[k].dtype != t.dtype or not np.array_equal(back[k].data, t.data)
    ]
    return bad + [k for k in back if k not in expected]
