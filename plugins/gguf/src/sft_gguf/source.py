"""What the GGUF is made from: an HF model directory, and its tensors read with numpy alone.

`resolve_source` turns `sft export RUN_DIR` into a Hugging Face model directory (config.json,
*.safetensors, tokenizer files): a plain model directory is used as is, a full fine-tuning run
gives `RUN_DIR/final/model` (or `RUN_DIR/final`, where the torch backend saves a full model),
and a LoRA run is merged first by the `hf` exporter (torch backend).
`read_tensors` reads safetensors with core's numpy reader (`sft.safetensors_io`), widening
F16/BF16 to float32 exactly, so this plugin works in any environment (`.venvs/core` included).

    >>> src = resolve_source(Path("runs/demo"), Path("exports/gguf"))
    >>> tensors = read_tensors(src)           # name -> float32 numpy array (memory-mapped)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sft.errors import SftError
from sft.rundir import config_path, final_dir, find_final_weights
from sft.safetensors_io import read_dir, weight_files

MERGED_DIRNAME = ".hf-merged"
"""Where a LoRA run is merged (inside the export directory); removed after verification."""


def is_model_dir(path: Path) -> bool:
    """A Hugging Face model directory: config.json plus at least one safetensors file."""
    return (path / "config.json").is_file() and bool(safetensors_files(path))


def resolve_source(run_dir: Path, out_dir: Path) -> Path:
    """The HF model directory to convert for `sft export RUN_DIR` (see the module docstring)."""
    run_dir = Path(run_dir)
    if is_model_dir(run_dir):
        return run_dir
    found = find_final_weights(run_dir)
    if found and found.model and is_model_dir(found.model):
        return found.model  # full fine-tuning: the run saved a whole model
    if not final_dir(run_dir).is_dir() and not config_path(run_dir).is_file():
        raise SftError(
            f"{run_dir} is neither a Hugging Face model directory (config.json + *.safetensors) "
            "nor an sft run directory (config.yaml, final/); pass one of those to `sft export`"
        )
    return _merge_with_hf_exporter(run_dir, out_dir / MERGED_DIRNAME)


def _merge_with_hf_exporter(run_dir: Path, merged_dir: Path) -> Path:
    # The merge (base + LoRA) needs torch and peft, which this plugin deliberately avoids:
    # the torch backend's `hf` exporter does it and verifies its own logits.
    from sft.export import ExportRequest, run_export
    from sft.plugins import get_plugins

    if "hf" not in get_plugins().exporters:
        raise SftError(
            f"{run_dir} holds an adapter, not a full model, and merging it needs the `hf` "
            "exporter of the torch backend: pip install -e backends/torch (or `pip install "
            "sft[torch]`), or pass an already merged HF model directory to `sft export`"
        )
    report = run_export("hf", ExportRequest(run_dir=run_dir, out=merged_dir, dtype="f32"))
    merged = Path(report.path)
    if not is_model_dir(merged):
        raise SftError(f"the hf exporter wrote {merged}, which is not an HF model directory")
    return merged


def load_config(model_dir: Path) -> dict:
    """config.json, with transformers 5's `rope_parameters` folded back into `rope_theta`."""
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(cfg.get("text_config") or {})
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if cfg.get("rope_theta") is None and isinstance(rope, dict) and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    return cfg


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight shards, as llama.cpp's converter finds them (model*.safetensors)."""
    return weight_files(model_dir, "model*.safetensors")


_FLOATS = ("F32", "F16", "BF16", "F64")


def read_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of the model as float32 (F32 ones are zero-copy memory maps)."""
    tensors = {}
    for name, t in read_dir(model_dir, "model*.safetensors", copy=False).items():
        if t.dtype not in _FLOATS:
            raise SftError(
                f"tensor {name!r} has dtype {t.dtype}; GGUF export reads F32, F16, BF16 and F64 "
                "weights (a quantized checkpoint must be dequantized first, e.g. by the hf "
                "exporter)"
            )
        tensors[name] = t.to_float32()
    return tensors
