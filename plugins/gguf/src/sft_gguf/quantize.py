"""The k-quants (q4_k_m, q5_k_m, q6_k), made by llama.cpp's own quantizer through llama-cpp-python.

gguf-py quantizes the block types (q8_0, q5_1, q5_0, q4_1, q4_0) but not the k-quants, whose
per-tensor type choice ("_m": some attention/ffn tensors one step up) and scale search belong
to llama.cpp. So the writer first writes an f16 GGUF, and `llama_model_quantize` (the function
behind `llama-quantize`) turns it into the k-quant file. llama-cpp-python compiles llama.cpp:

    $ CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install "llama-cpp-python==0.3.36"
    $ sft export runs/smollm2-135m-lora --format gguf --dtype q4_k_m
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import gguf
from sft.errors import SftError

LLAMA_CPP_TYPES = {
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
}
"""`--dtype` quantized by llama.cpp -> its `llama_ftype` (= general.file_type)."""

INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install "llama-cpp-python==0.3.36"'


def llama_cpp_missing(dtype: str) -> str | None:
    """Why `dtype` cannot be written here (llama-cpp-python absent), or None."""
    if dtype not in LLAMA_CPP_TYPES or importlib.util.find_spec("llama_cpp") is not None:
        return None
    return (
        f"GGUF {dtype} is made by llama.cpp's own quantizer, from llama-cpp-python, which is not "
        f"installed in this environment: {INSTALL} (compiles llama.cpp, which takes minutes); "
        "or use q8_0, q5_1, q5_0, q4_1 or q4_0, which need no llama.cpp"
    )


def quantize_with_llama_cpp(f16_path: Path, out_path: Path, dtype: str) -> None:
    """Quantize the f16 GGUF `f16_path` into `out_path` as llama-quantize would."""
    problem = llama_cpp_missing(dtype)
    if problem:
        raise SftError(problem)
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(LLAMA_CPP_TYPES[dtype])
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(
        str(f16_path).encode(), str(out_path).encode(), ctypes.byref(params)
    )
    if rc != 0:
        out_path.unlink(missing_ok=True)
        raise SftError(f"llama.cpp's quantizer failed ({rc}) turning {f16_path} into {dtype}")
