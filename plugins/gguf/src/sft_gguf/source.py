"""What the GGUF is made from: an HF model directory, and its tensors read with numpy alone.

`resolve_source` turns `sft export RUN_DIR` into a Hugging Face model directory (config.json,
*.safetensors, tokenizer files): a plain model directory is used as is, a full fine-tuning run
gives `RUN_DIR/final/model` (or `RUN_DIR/final`, where the torch backend saves a full model),
and a LoRA run is merged first by the `hf` exporter (torch backend).
`read_tensors` reads safetensors without torch or the safetensors package, widening F16/BF16 to
float32 exactly, so this plugin works in any environment (`.venvs/core` included).

    >>> src = resolve_source(Path("runs/demo"), Path("exports/gguf"))
    >>> tensors = read_tensors(src)           # name -> float32 numpy array (memory-mapped)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sft.errors import SftError

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
    for full in (run_dir / "final" / "model", run_dir / "final"):
        if is_model_dir(full):  # full fine-tuning: the run saved a whole model
            return full
    if not (run_dir / "final").is_dir() and not (run_dir / "config.yaml").is_file():
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
    return sorted(p for p in Path(model_dir).glob("model*.safetensors") if p.is_file())


def read_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of the model as float32 (F32 ones are zero-copy memory maps)."""
    files = safetensors_files(model_dir)
    if not files:
        raise SftError(f"no model*.safetensors in {model_dir}; is it a Hugging Face model dir?")
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        for name, arr in _read_file(path).items():
            if name in tensors:
                raise SftError(f"tensor {name!r} appears in two shards of {model_dir}")
            tensors[name] = arr
    return tensors


def _read_file(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    start = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out[name] = to_float32(raw[start + begin : start + end], info["dtype"], info["shape"], name)
    return out


def to_float32(buf: np.ndarray, dtype: str, shape: list[int], name: str = "?") -> np.ndarray:
    """Little-endian safetensors bytes -> float32, exactly (bf16 is the top half of a float32)."""
    if dtype == "F32":
        return buf.view("<f4").reshape(shape)
    if dtype == "F16":
        return buf.view("<f2").astype(np.float32).reshape(shape)
    if dtype == "BF16":
        return (buf.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if dtype == "F64":
        return buf.view("<f8").astype(np.float32).reshape(shape)
    raise SftError(
        f"tensor {name!r} has dtype {dtype}; GGUF export reads F32, F16, BF16 and F64 weights "
        "(a quantized checkpoint must be dequantized first, e.g. by the hf exporter)"
    )
