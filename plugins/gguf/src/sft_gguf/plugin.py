"""The `gguf` export format: registration (entry point `sft`) and the export flow.

    $ sft export runs/smollm2-135m-lora --format gguf --dtype q8_0 --out exports/
    $ sft export path/to/hf-model --format gguf --dtype f16 --out exports/
    $ sft export path/to/hf-model --format gguf --dtype q4_k_m    # needs llama-cpp-python

Flow: find the HF model to convert (`source.resolve_source`: a model dir as is, a full run's
final/model, or a LoRA run merged by the torch backend's `hf` exporter), write
`<name>-<dtype>.gguf` (`writer`), read it back and compare every tensor and the metadata with
the source (`verify`). The report's `checks` carry the numbers; any disagreement makes
`ok` false and `sft export` fail. This module imports nothing heavy: `sft plugins` stays fast.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from sft.errors import SftError
from sft.export import ExportReport, ExportRequest
from sft.hookspecs import hookimpl

GGUF_PY_DTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
"""Written by gguf-py alone."""
LLAMA_CPP_DTYPES = ("q4_k_m", "q5_k_m", "q6_k")
"""Quantized by llama.cpp's quantizer (llama-cpp-python), see `quantize`."""
DTYPES = GGUF_PY_DTYPES + LLAMA_CPP_DTYPES


@hookimpl
def sft_register_exporters(register: Any) -> None:
    register(
        "gguf",
        export_gguf,
        description=f"GGUF for llama.cpp/Ollama (llama, mistral, qwen2, qwen3; {', '.join(DTYPES)}), read back "
        "and compared with the source",
    )


@hookimpl
def sft_validate_config(config: Any) -> list[str] | None:
    """A k-quant export after training needs llama-cpp-python: say so before training starts."""
    if "gguf" not in config.export.formats:
        return None
    from sft_gguf.quantize import llama_cpp_missing

    problem = llama_cpp_missing(config.export.dtype)
    return [f"export.dtype: {problem}"] if problem else None


def export_gguf(request: ExportRequest) -> ExportReport:
    """Write and verify `<out>/<name>-<dtype>.gguf` for `request.run_dir`."""
    from sft_gguf.source import MERGED_DIRNAME, resolve_source
    from sft_gguf.verify import verify_gguf
    from sft_gguf.writer import write_gguf

    dtype = check_dtype(request.dtype)
    out_dir = Path(request.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    source = resolve_source(Path(request.run_dir), out_dir)
    name = Path(request.run_dir).resolve().name
    path = out_dir / f"{name}-{dtype}.gguf"
    written = write_gguf(source, path, dtype, name=name)
    checks, problems = verify_gguf(path, source, dtype)
    report = ExportReport(
        format="gguf",
        path=str(path),
        checks={
            "source": str(source),
            "dtype": dtype,
            "file_bytes": path.stat().st_size,
            "tensor_types": written.tensor_types,
            **checks,
            "problems": problems,
            "seconds": round(time.perf_counter() - started, 2),
        },
        ok=not problems,
    )
    merged = out_dir / MERGED_DIRNAME
    if merged.is_dir() and not request.options.get("keep_merged"):
        # The merged float32 model was only the GGUF's source; it is as big as the model.
        shutil.rmtree(merged)
        report.checks["source"] += " (merged by the hf exporter, removed after verification)"
    return report


def check_dtype(dtype: str) -> str:
    from sft_gguf.quantize import llama_cpp_missing

    d = (dtype or "").lower()
    if d not in DTYPES:
        raise SftError(
            f"GGUF export writes --dtype {', '.join(DTYPES)}, not {dtype!r} "
            "(for other types, quantize the f16 GGUF with llama.cpp's llama-quantize)"
        )
    problem = llama_cpp_missing(d)
    if problem:
        raise SftError(problem)
    return d
