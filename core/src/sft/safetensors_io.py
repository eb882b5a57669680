"""Safetensors files read and written with numpy alone, for code that must not need torch.

The MindSpore backend (HF <-> MindSpore weights) and the GGUF plugin (any environment) read
Hugging Face weights without torch. numpy has no bfloat16, so a `Tensor` carries the raw data
plus its safetensors dtype (`BF16` data is the uint16 bit pattern); this is also why the
`safetensors` package's numpy API, which cannot load BF16, is not used here.

    >>> t = read_file(Path("model.safetensors"))["lm_head.weight"]
    >>> t.dtype, t.data.shape, t.to_float32().dtype      # ('BF16', (256, 64), float32)
    >>> write_file({"w": Tensor(np.zeros((2, 2), np.float32), "F32")}, Path("out.safetensors"))
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from sft.errors import SftError

DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "BF16": np.uint16,
}
"""safetensors dtype -> the numpy dtype its data is held in (BF16 as its raw bits)."""


class Tensor:
    """A weight as numpy data plus its safetensors dtype (`BF16` data is uint16 bits)."""

    __slots__ = ("data", "dtype")

    def __init__(self, data: np.ndarray, dtype: str) -> None:
        self.data, self.dtype = data, dtype

    def to_float32(self) -> np.ndarray:
        """The values as float32, exactly for F32/F16/BF16 (F32 data is returned as is)."""
        if self.dtype == "BF16":  # widening bf16 -> f32 is exact: the bits become the high half
            return (self.data.astype(np.uint32) << 16).view(np.float32)
        return self.data.astype(np.float32, copy=False)


def read_file(path: str | Path, copy: bool = True) -> dict[str, Tensor]:
    """Every tensor of one safetensors file. With `copy=False` the data are read-only memory
    maps of the file (nothing is read until used)."""
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise SftError(
                f"{path}: tensor {name} has dtype {info['dtype']}, not supported (numpy reads "
                f"{', '.join(DTYPES)}); dequantize a quantized checkpoint first"
            )
        a, b = info["data_offsets"]
        arr = raw[base + a : base + b].view(DTYPES[info["dtype"]]).reshape(info["shape"])
        out[name] = Tensor(arr.copy() if copy else arr, info["dtype"])
    return out


def write_file(tensors: dict[str, Tensor], path: str | Path) -> None:
    """Write `tensors` (sorted by name, as the safetensors package does) to `path`."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset, blobs = 0, []
    for name in sorted(tensors):
        t = tensors[name]
        blob = np.ascontiguousarray(t.data).tobytes()
        header[name] = {
            "dtype": t.dtype,
            "shape": list(t.data.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        blobs.append(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data start to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for blob in blobs:
            f.write(blob)


def weight_files(model_dir: str | Path, pattern: str = "*.safetensors") -> list[Path]:
    """The safetensors files of a model directory, sorted."""
    return sorted(p for p in Path(model_dir).glob(pattern) if p.is_file())


def read_dir(
    model_dir: str | Path, pattern: str = "*.safetensors", copy: bool = True
) -> dict[str, Tensor]:
    """Every tensor of a Hugging Face model directory (one or many safetensors shards)."""
    files = weight_files(model_dir, pattern)
    if not files:
        raise SftError(f"{model_dir}: no {pattern} files; give a Hugging Face model directory")
    out: dict[str, Tensor] = {}
    for f in files:
        for name, t in read_file(f, copy=copy).items():
            if name in out:
                raise SftError(f"tensor {name!r} appears in two shards of {model_dir}")
            out[name] = t
    return out
