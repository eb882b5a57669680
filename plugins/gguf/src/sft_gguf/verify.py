"""Read a written GGUF back with gguf-py's reader and compare it with the HF model it came from.

Every tensor is dequantized (`gguf.quants.dequantize`), its llama q/k permutation undone, and
compared with the source tensor element by element against the tolerance of its GGML type:
F32 must be bit-exact, F16/BF16 within half a unit in the last place, and each block type within
a bound derived from its quantizer and its block's values (`BLOCK_BOUNDS`, `tolerance`).
For the k-quants, which llama.cpp's quantizer makes from an f16 file and whose tensor types it
chooses itself, each tensor is held to one step of a plain quantizer with as many bits over its
256-value super-block (`K_BITS`), plus the f16 rounding of the intermediate file.
Metadata (architecture, hyperparameters, file type), the tokenizer (tokens, types, merges,
special ids, add-BOS) and the chat template are compared with what the source says.

    >>> checks, problems = verify_gguf(Path("model-q8_0.gguf"), Path("merged-model"), "q8_0")
    >>> problems          # [] when everything agrees
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from sft_gguf.arch import (
    SKIPPED_SUFFIXES,
    ArchSpec,
    arch_spec,
    from_gguf_layout,
    gguf_name,
    hparams,
    to_gguf_layout,
)
from sft_gguf.quantize import LLAMA_CPP_TYPES
from sft_gguf.source import load_config, read_tensors
from sft_gguf.vocab import Vocab, load_vocab
from sft_gguf.writer import output_tensor, tensor_qtype

Q = gguf.GGMLQuantizationType
RELATIVE_TOLERANCE = {Q.F32: 0.0, Q.F16: 2.0**-11, Q.BF16: 2.0**-8}
"""Half an ulp: the largest relative error of round-to-nearest into each float type."""
ABSOLUTE_TOLERANCE = {Q.F32: 0.0, Q.F16: 2.0**-25, Q.BF16: 0.0}
"""Half the smallest subnormal step (F16 flushes tiny values to its subnormals)."""
F16_HALF_ULP = 2.0**-11

BLOCK_BOUNDS = {
    Q.Q8_0: (False, 127, 0.5, 128),
    Q.Q5_0: (False, 16, 1.0, 16),
    Q.Q4_0: (False, 8, 1.0, 8),
    Q.Q5_1: (True, 31, 0.5, 31),
    Q.Q4_1: (True, 15, 0.5, 15),
}
"""Blocks of 32: (has a min, levels per step, steps of rounding error, max |q| times the scale).

Q8_0/Q5_0/Q4_0 store `d * q` with d = the block's largest |value| / levels; Q5_1/Q4_1 store
`min + d * q` with d = (max - min) / levels. The rounding error is half a step, except that
Q5_0/Q4_0 put the largest value at -16/-8 and clip its opposite at +15/+7: a whole step. The
scale d (and min) are stored as F16, which adds up to max |q| * |d| * 2^-11 (and |min| * 2^-11).
"""
K_BITS = {Q.Q2_K: 2, Q.Q3_K: 3, Q.Q4_K: 4, Q.Q5_K: 5, Q.Q6_K: 6}
"""k-quant -> bits per value; the bound is (max - min of the super-block) / (2^bits - 1)."""

_T = gguf.Keys.Tokenizer
ID_KEYS = {
    "bos": _T.BOS_ID,
    "eos": _T.EOS_ID,
    "eot": _T.EOT_ID,
    "unk": _T.UNK_ID,
    "sep": _T.SEP_ID,
    "pad": _T.PAD_ID,
    "mask": _T.MASK_ID,
}
"""SpecialVocab's token types -> the GGUF keys its writer uses."""
ADD_KEYS = {"bos": _T.ADD_BOS, "eos": _T.ADD_EOS, "sep": _T.ADD_SEP}


def verify_gguf(path: Path, model_dir: Path, dtype: str) -> tuple[dict[str, Any], list[str]]:
    """(checks with numbers, problems); an empty problem list means the file is faithful."""
    reader = gguf.GGUFReader(path)
    cfg = load_config(model_dir)
    spec = arch_spec(cfg)
    problems: list[str] = []
    checks: dict[str, Any] = {"architecture": spec.name}
    checks.update(check_metadata(reader, cfg, spec, dtype, problems))
    checks.update(check_vocab(reader, load_vocab(model_dir, cfg, spec), problems))
    checks.update(check_tensors(reader, model_dir, cfg, spec, dtype, problems))
    return checks, problems


def field_value(reader: gguf.GGUFReader, key: str) -> Any:
    """A metadata value as Python data (None when the key is absent)."""
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def check_metadata(
    reader: gguf.GGUFReader, cfg: dict, spec: ArchSpec, dtype: str, problems: list[str]
) -> dict[str, Any]:
    arch = field_value(reader, gguf.Keys.General.ARCHITECTURE)
    if arch != spec.name:
        problems.append(f"general.architecture is {arch!r}, expected {spec.name!r}")
    compared = 0
    for key, expected, kind in hparams(cfg, spec, dtype):
        got = field_value(reader, key)
        want = float(np.float32(expected)) if kind == "f32" else expected
        if got is None or (float(got) if kind == "f32" else got) != want:
            problems.append(f"{key} is {got!r}, config.json says {want!r}")
        compared += 1
    return {
        "metadata_keys_compared": compared,
        "block_count": field_value(reader, f"{spec.name}.block_count"),
        "vocab_size": field_value(reader, f"{spec.name}.vocab_size"),
        "file_type": field_value(reader, gguf.Keys.General.FILE_TYPE),
    }


def check_vocab(reader: gguf.GGUFReader, vocab: Vocab, problems: list[str]) -> dict[str, Any]:
    t = gguf.Keys.Tokenizer
    expected: dict[str, Any] = {
        t.MODEL: vocab.model,
        t.PRE: vocab.pre,
        t.LIST: vocab.tokens,
        t.TOKEN_TYPE: vocab.toktypes,
        t.MERGES: vocab.special.merges,
        t.CHAT_TEMPLATE: default_template(vocab.special.chat_template),
    }
    for typ, tid in vocab.special.special_token_ids.items():
        if typ in ID_KEYS:  # SpecialVocab skips types gguf has no key for (e.g. cls)
            expected[ID_KEYS[typ]] = tid
    for typ, flag in vocab.special.add_special_token.items():
        if typ in ADD_KEYS:
            expected[ADD_KEYS[typ]] = flag
    if vocab.add_space_prefix is not None:
        expected[t.ADD_PREFIX] = vocab.add_space_prefix
    for key, want in expected.items():
        got = field_value(reader, key)
        if got != want:
            problems.append(
                f"{key} differs from the source tokenizer ({_short(got)} != {_short(want)})"
            )
    return {
        "tokens": len(vocab.tokens),
        "merges": len(vocab.special.merges),
        "tokenizer_pre": vocab.pre,
        "chat_template_chars": len(default_template(vocab.special.chat_template) or ""),
        **check_eos(reader, vocab, problems),
    }


def default_template(template: Any) -> str | None:
    """The template llama.cpp uses: a list of named templates stores "default" in the main key."""
    if isinstance(template, list):
        return next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def check_eos(reader: gguf.GGUFReader, vocab: Vocab, problems: list[str]) -> dict[str, Any]:
    """The end of a chat turn (generation_config.json) must stop llama.cpp: it is EOS or EOT."""
    eos = field_value(reader, gguf.Keys.Tokenizer.EOS_ID)
    eot = field_value(reader, gguf.Keys.Tokenizer.EOT_ID)
    if eos is None:
        problems.append("the GGUF has no tokenizer.ggml.eos_token_id; llama.cpp would not stop")
    if vocab.hf_eos_ids and vocab.hf_eos_ids[0] not in (eos, eot):
        problems.append(
            f"generation_config.json ends turns with token {vocab.hf_eos_ids[0]}, but the GGUF's "
            f"EOS is {eos} and EOT {eot}: llama.cpp would not stop at the end of a reply"
        )
    text = vocab.tokens[eos] if isinstance(eos, int) and 0 <= eos < len(vocab.tokens) else None
    return {"eos_token_id": eos, "eos_token": text, "eot_token_id": eot}


def _short(value: Any) -> str:
    if isinstance(value, list):
        return f"list of {len(value)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_tensors(
    reader: gguf.GGUFReader,
    model_dir: Path,
    cfg: dict,
    spec: ArchSpec,
    dtype: str,
    problems: list[str],
) -> dict[str, Any]:
    """Compare every tensor; per GGML type: how many, the max |diff| and the tolerance used."""
    tensor_map = gguf.get_tensor_name_map(spec.arch, int(cfg["num_hidden_layers"]))
    source = {
        gguf_name(n, tensor_map): (n, t)
        for n, t in read_tensors(model_dir).items()
        if not n.endswith(SKIPPED_SUFFIXES)
    }
    stored = {t.name: t for t in reader.tensors}
    for name in sorted(source.keys() - stored.keys()):
        problems.append(f"tensor {name} ({source[name][0]}) is missing from the GGUF")
    for name in sorted(stored.keys() - source.keys()):
        problems.append(f"tensor {name} in the GGUF has no source tensor")
    output_name = output_tensor(set(source))
    embd = source.get("token_embd.weight")
    if embd is not None and embd[1].shape[0] != int(cfg["vocab_size"]):
        problems.append(
            f"token_embd has {embd[1].shape[0]} rows but vocab_size is {cfg['vocab_size']}; "
            "llama.cpp refuses such a file (fix config.json or resize the embeddings)"
        )
    by_type: dict[str, dict[str, Any]] = {}
    for name in sorted(source.keys() & stored.keys()):
        hf_name, src = source[name]
        diff, bound_ratio = compare_tensor(
            stored[name], hf_name, src, cfg, spec, dtype, problems, output_name
        )
        entry = by_type.setdefault(
            stored[name].tensor_type.name,
            {"tensors": 0, "max_abs_diff": 0.0, "max_diff_over_tolerance": 0.0},
        )
        entry["tensors"] += 1
        entry["max_abs_diff"] = max(entry["max_abs_diff"], diff)
        entry["max_diff_over_tolerance"] = max(entry["max_diff_over_tolerance"], bound_ratio)
    return {
        "tensors_compared": sum(e["tensors"] for e in by_type.values()),
        "tensors_in_source": len(source),
        "max_abs_diff": {k: v["max_abs_diff"] for k, v in sorted(by_type.items())},
        "by_type": dict(sorted(by_type.items())),
    }


def compare_tensor(
    t: Any,
    hf_name: str,
    src: np.ndarray,
    cfg: dict,
    spec: ArchSpec,
    dtype: str,
    problems: list[str],
    output_name: str = "output.weight",
) -> tuple[float, float]:
    """(max |gguf - source|, max |diff| / tolerance); records a problem when out of tolerance."""
    src = np.asarray(src, dtype=np.float32)
    by_llama_cpp = dtype in LLAMA_CPP_TYPES
    # llama.cpp picks each tensor's type in a k-quant file; the 1-D ones must stay F32
    want_type = Q.F32 if by_llama_cpp else tensor_qtype(t.name, src, dtype, output_name)
    if t.tensor_type != want_type and not (by_llama_cpp and src.ndim == 2):
        problems.append(f"{t.name} is stored as {t.tensor_type.name}, expected {want_type.name}")
    known = (*RELATIVE_TOLERANCE, *BLOCK_BOUNDS, *K_BITS)
    if t.tensor_type not in known:
        problems.append(f"{t.name} is stored as {t.tensor_type.name}, which sft cannot check")
        return float("inf"), float("inf")
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if shape != src.shape:
        problems.append(f"{t.name} has shape {shape}, the source {hf_name} {src.shape}")
        return float("inf"), float("inf")
    values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(src.shape)
    values = from_gguf_layout(hf_name, values.astype(np.float32), cfg, spec)
    diff = np.abs(values.astype(np.float64) - src.astype(np.float64))
    bound = tolerance(t.tensor_type, hf_name, src, cfg, spec)
    if by_llama_cpp and t.tensor_type != Q.F32:  # quantized from the f16 intermediate file
        bound = bound + np.abs(src.astype(np.float64)) * F16_HALF_ULP + 2.0**-25
    bad = ~(diff <= bound)  # NaN and inf count as out of tolerance
    worst = float(np.max(diff)) if diff.size else 0.0
    worst = worst if np.isfinite(worst) else float("inf")
    over = np.divide(diff, bound, out=np.where(diff > 0, np.inf, 0.0), where=bound > 0)
    ratio = float(np.max(over)) if over.size else 0.0
    if bad.any():
        problems.append(
            f"{t.name} ({t.tensor_type.name}) differs from {hf_name}: {int(bad.sum())} values "
            f"out of tolerance, max |diff| {worst:.3g}"
        )
    return worst, ratio


def tolerance(qtype: Any, hf_name: str, src: np.ndarray, cfg: dict, spec: ArchSpec) -> np.ndarray:
    """Per-element allowed |diff| for a source tensor stored as `qtype`."""
    magnitude = np.abs(src.astype(np.float64))
    if qtype in RELATIVE_TOLERANCE:
        return magnitude * RELATIVE_TOLERANCE[qtype] + ABSOLUTE_TOLERANCE[qtype]
    # Blocks are consecutive values of a row in GGUF layout: bound each by its own values.
    laid_out = to_gguf_layout(hf_name, src.astype(np.float64), cfg, spec)
    if qtype in BLOCK_BOUNDS:
        has_min, levels, steps, max_q = BLOCK_BOUNDS[qtype]
        blocks = laid_out.reshape(-1, 32)
        lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
        if has_min:
            step = (hi - lo) / levels
            bound = step * steps + (max_q * step + np.abs(lo)) * F16_HALF_ULP
        else:
            step = np.maximum(np.abs(lo), np.abs(hi)) / levels
            bound = step * steps + max_q * step * F16_HALF_ULP
    elif qtype in K_BITS:
        blocks = laid_out.reshape(-1, 256)
        lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
        bound = (hi - lo) / (2 ** K_BITS[qtype] - 1)
    else:
        raise ValueError(f"no tolerance defined for {qtype.name}")
    bound = np.broadcast_to(bound + 2.0**-25, blocks.shape).reshape(laid_out.shape)
    return from_gguf_layout(hf_name, np.ascontiguousarray(bound), cfg, spec)
