"""Write the GGUF file: hyperparameters, tokenizer metadata and tensors, with gguf-py's writer.

Tensor types follow llama.cpp's converter (`prepare_tensors`): 1-D tensors, norms and biases
stay F32; every other weight takes the file's type (F32, F16, BF16 or Q8_0, quantized by
`gguf.quants`), falling back to F16 when a row does not split into Q8_0 blocks of 32.

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
from sft_gguf.source import load_config, read_tensors
from sft_gguf.vocab import load_vocab

QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
"""`--dtype` -> the type of the file's 2-D weights."""


@dataclass
class WriteResult:
    path: Path
    tensor_types: dict[str, int] = field(default_factory=dict)
    """GGML type name -> number of tensors written with it."""


def tensor_qtype(name: str, data: np.ndarray, dtype: str) -> gguf.GGMLQuantizationType:
    """The GGML type of one tensor in a file of `dtype` (llama.cpp's converter's rule)."""
    if data.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    qtype = QTYPES[dtype]
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
        return gguf.GGMLQuantizationType.F16
    return qtype


def write_gguf(model_dir: Path, out_path: Path, dtype: str, name: str = "") -> WriteResult:
    """Convert the HF model in `model_dir` into `out_path` (written atomically); `name` goes
    into general.name (default: the file name)."""
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
    for hf_name, data in read_tensors(model_dir).items():
        if hf_name.endswith(SKIPPED_SUFFIXES):
            continue
        name = gguf_name(hf_name, tensor_map)
        data = to_gguf_layout(hf_name, np.asarray(data, dtype=np.float32), cfg, spec)
        qtype = tensor_qtype(name, data, dtype)
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        types[qtype.name] += 1
    return types
