"""Write the GGUF file: hyperparameters, tokenizer metadata and tensors, with gguf-py's writer.

Tensor types follow llama.cpp's converter (`prepare_tensors`): 1-D tensors, norms and biases
stay F32; every other weight takes the file's type (F32, F16, BF16, or Q8_0/Q5_1/Q5_0/Q4_1/Q4_0
quantized by `gguf.quants`), falling back to F16 when a row does not split into blocks of 32.
In the 4- and 5-bit types the output matrix (`output.weight`, or `token_embd.weight` when the
lm_head is tied to it) is Q8_0, as llama.cpp's `llama-quantize` keeps it at 6 bits or more:
it is the tensor whose error reaches every logit directly.

The k-quants (q4_k_m, q5_k_m, q6_k) are made by llama.cpp's own quantizer (`quantize`) from an
f16 file written here first; it picks each tensor's type itself.

    >>> write_gguf(Path("merged-model"), Path("exports/model-q8_0.gguf"), "q8_0")
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from sft_gguf.arch import (
    SKIPPED_SUFFIXES,
    arch_spec,
    check_unsupported_features,
    gguf_name,
    hparams,
    to_gguf_layout,
)
from sft_gguf.quantize import LLAMA_CPP_TYPES, quantize_with_llama_cpp
from sft_gguf.source import load_config, read_tensors
from sft_gguf.vocab import load_vocab

Q = gguf.GGMLQuantizationType
QTYPES = {
    "f32": Q.F32,
    "f16": Q.F16,
    "bf16": Q.BF16,
    "q8_0": Q.Q8_0,
    "q5_1": Q.Q5_1,
    "q5_0": Q.Q5_0,
    "q4_1": Q.Q4_1,
    "q4_0": Q.Q4_0,
}
"""`--dtype` written by gguf-py -> the type of the file's 2-D weights."""
BLOCK_TYPES = (Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0)
"""Types stored in blocks of 32 values of a row."""


@dataclass
class WriteResult:
    path: Path
    tensor_types: dict[str, int] = field(default_factory=dict)
    """GGML type name -> number of tensors written with it."""


def tensor_qtype(
    name: str, data: np.ndarray, dtype: str, output_name: str = "output.weight"
) -> gguf.GGMLQuantizationType:
    """The GGML type of one tensor in a file of `dtype` (llama.cpp's converter's rule);
    `output_name` is the tensor llama.cpp multiplies the last hidden state with."""
    if data.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    qtype = QTYPES[dtype]
    if qtype in BLOCK_TYPES and qtype != Q.Q8_0 and name == output_name:
        qtype = Q.Q8_0
    if qtype in BLOCK_TYPES and data.shape[-1] % 32:
        return Q.F16
    return qtype


def output_tensor(names: set[str]) -> str:
    """`output.weight`, or `token_embd.weight` when the lm_head is tied to the embeddings."""
    return "output.weight" if "output.weight" in names else "token_embd.weight"


def write_gguf(model_dir: Path, out_path: Path, dtype: str, name: str = "") -> WriteResult:
    """Convert the HF model in `model_dir` into `out_path` (written atomically); `name` goes
    into general.name (default: the file name)."""
    if dtype in LLAMA_CPP_TYPES:
        f16 = out_path.with_name(out_path.name + ".f16.partial")
        try:
            write_gguf(model_dir, f16, "f16", name=name or out_path.stem)
            tmp = out_path.with_name(out_path.name + ".partial")
            quantize_with_llama_cpp(f16, tmp, dtype)
        finally:
            f16.unlink(missing_ok=True)
        tmp.replace(out_path)
        reader = gguf.GGUFReader(out_path)
        return WriteResult(out_path, dict(Counter(t.tensor_type.name for t in reader.tensors)))
    cfg = load_config(model_dir)
    spec = arch_spec(cfg)
    check_unsupported_features(cfg)
    vocab = load_vocab(model_dir, cfg, spec)
    tmp = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(path=None, arch=spec.name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or out_path.stem)
    for key, value, kind in hparams(cfg, spec, dtype):
        (writer.add_uint32 if kind == "u32" else writer.add_float32)(key, value)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add_to(writer)
    types = _add_tensors(writer, model_dir, cfg, dtype)
    writer.write_header_to_file(path=tmp)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out_path)
    return WriteResult(path=out_path, tensor_types=dict(types))


def _add_tensors(writer: gguf.GGUFWriter, model_dir: Path, cfg: dict, dtype: str) -> Counter:
    spec = arch_spec(cfg)
    tensor_map = gguf.get_tensor_name_map(spec.arch, int(cfg["num_hidden_layers"]))
    types: Counter = Counter()
    tensors = {
        gguf_name(hf_name, tensor_map): (hf_name, data)
        for hf_name, data in read_tensors(model_dir).items()
        if not hf_name.endswith(SKIPPED_SUFFIXES)
    }
    output_name = output_tensor(set(tensors))
    for name, (hf_name, data) in tensors.items():
        data = to_gguf_layout(hf_name, np.asarray(data, dtype=np.float32), cfg, spec)
        qtype = tensor_qtype(name, data, dtype, output_name)
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        types[qtype.name] += 1
    return types
