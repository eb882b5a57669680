"""Core's numpy safetensors reader/writer agrees with the `safetensors` package both ways."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from sft.errors import SftError
from sft.safetensors_io import Tensor, read_dir, read_file, write_file


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "b.half": rng.standard_normal((4,)).astype(np.float16),
        "c.ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "d.scalar": np.array(2.5, dtype=np.float64),
    }


@pytest.mark.parametrize("copy", [True, False])
def test_reads_what_the_safetensors_package_writes(tmp_path, copy) -> None:
    save_file(_arrays(), str(tmp_path / "model.safetensors"))
    got = read_file(tmp_path / "model.safetensors", copy=copy)
    assert got.keys() == _arrays().keys()
    for name, want in _arrays().items():
        assert got[name].data.dtype == want.dtype and np.array_equal(got[name].data, want), name


def test_the_safetensors_package_reads_what_it_writes(tmp_path) -> None:
    write_file({k: Tensor(v, _st(v)) for k, v in _arrays().items()}, tmp_path / "x.safetensors")
    back = load_file(str(tmp_path / "x.safetensors"))
    for name, want in _arrays().items():
        assert back[name].dtype == want.dtype and np.array_equal(back[name], want), name


def _st(a: np.ndarray) -> str:
    return {"float32": "F32", "float16": "F16", "int64": "I64", "float64": "F64"}[a.dtype.name]


def test_bf16_bits_widen_exactly(tmp_path) -> None:
    bits = np.array([0x3F80, 0xC020, 0x0000, 0x3EAB], dtype=np.uint16)  # 1, -2.5, 0, ~0.334
    write_file({"w": Tensor(bits, "BF16")}, tmp_path / "m.safetensors")
    t = read_file(tmp_path / "m.safetensors")["w"]
    assert t.dtype == "BF16" and np.array_equal(t.data, bits)
    assert t.to_float32().tolist() == [1.0, -2.5, 0.0, np.float32(0.333984375)]


def test_shards_are_merged_and_a_repeated_name_is_an_error(tmp_path) -> None:
    one = {"x": Tensor(np.ones(2, np.float32), "F32")}
    write_file(one, tmp_path / "model-1.safetensors")
    write_file({"y": Tensor(np.zeros(3, np.float32), "F32")}, tmp_path / "model-2.safetensors")
    assert sorted(read_dir(tmp_path)) == ["x", "y"]
    write_file(one, tmp_path / "model-3.safetensors")
    with pytest.raises(SftError, match="'x' appears in two shards"):
        read_dir(tmp_path)
    with pytest.raises(SftError, match=r"no \*\.safetensors files"):
        read_dir(tmp_path / "missing")
