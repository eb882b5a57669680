"""Model resolution for the torch backend: built-in names, local `.gguf` files and hub ids become
cached Hugging Face safetensors directories (the `sft_resolve_model` hook).

    $ sft models prepare smollm2-135m-instruct      # convert once, print the directory
    $ sft models prepare ./MyModel.Q8_0.gguf

A GGUF file is dequantized once through transformers' GGUF loader (weights, tokenizer and chat
template all come from the file) and saved under `$SFT_CACHE_DIR/models/<name>-<hash>-<dtype>`.
The directory is written under a temporary name and renamed when complete, under a file lock, so
a crash never leaves half a model and concurrent processes convert only once. Hub ids are
downloaded (safetensors only) only when online and `HF_HUB_OFFLINE` is not set, at
`model.revision` when given; offline, a snapshot an earlier download left in the cache is used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sft
from sft.errors import SftError
from sft.models import BUILTIN_MODELS, HUB_ID, builtin_weights

DTYPES = ("float32", "bfloat16")


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits): the cache key of a converted GGUF."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (e.g. torchrun ranks converting the same model)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, cache_dir: Path, name: str, dtype: str = "float32") -> Path:
    """The cached HF directory converted from `gguf`; converts on first use only."""
    if dtype not in DTYPES:
        raise SftError(f"cannot convert GGUF to dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    target = cache_dir / f"{name}-{file_digest(gguf)}-{dtype}"
    if (target / "config.json").is_file():
        return target
    with file_lock(cache_dir / f".{target.name}.lock"):
        if (target / "config.json").is_file():  # another process finished while we waited
            return target
        tmp = cache_dir / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _convert_into(gguf, tmp, dtype)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_into(gguf: Path, out: Path, dtype: str) -> None:
    """Dequantize `gguf` with transformers and save it as safetensors + tokenizer in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name)
    try:
        tok = AutoTokenizer.from_pretrained(**where)
        lm: Any = AutoModelForCausalLM.from_pretrained(**where, dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SftError(
            f"cannot convert {gguf}: {exc}. transformers' GGUF loader supports llama, qwen2, "
            "mistral, gemma and a few more architectures; quantizations F32/F16/BF16/Q4-Q8/K"
        ) from exc
    # The dequantized weights are plain tensors; drop the GGUF "quantizer" so save_pretrained
    # writes ordinary safetensors and the saved config does not claim to be quantized.
    lm.hf_quantizer = None
    lm.is_quantized = False
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.generation_config.eos_token_id = end_of_turn_ids(tok) or lm.generation_config.eos_token_id
    out.mkdir(parents=True)
    lm.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    _legacy_config_keys(out / "config.json")
    (out / "sft_source.json").write_text(
        json.dumps({"gguf": str(gguf), "sha256_16": file_digest(gguf), "dtype": dtype}, indent=2)
    )


def _legacy_config_keys(path: Path) -> None:
    # transformers 5 writes rope settings only under `rope_parameters`; 4.x (the MindSpore venv)
    # reads `rope_theta` and would silently fall back to its default, so write both.
    cfg = json.loads(path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
        path.write_text(json.dumps(cfg, indent=2))


def end_of_turn_ids(tok: Any) -> list[int]:
    """Token ids that end an assistant turn in the tokenizer's chat template (the eos ids a
    generation_config.json must carry), found by rendering a probe conversation."""
    marker = "SFTPROBEANSWER"
    ids: list[int] = []
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            tokenize=False,
        )
        tail = text[text.rindex(marker) + len(marker) :] if marker in text else ""
        special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
        for tid in tok(tail, add_special_tokens=False)["input_ids"][:3]:
            if tid in special:
                ids.append(int(tid))
                break
    if tok.eos_token_id is not None and int(tok.eos_token_id) not in ids:
        ids.append(int(tok.eos_token_id))
    return ids


def cached_hub(repo_id: str, cache_dir: Path, revision: str | None) -> Path | None:
    """The snapshot of `repo_id` at `revision` that an earlier download left in the cache, or
    None (huggingface_hub's own cache lookup: refs/<revision> -> snapshots/<commit>)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(
            repo_id, revision=revision, cache_dir=str(cache_dir / "hub"), local_files_only=True
        )
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None
    return Path(path) if any(Path(path).glob("*.safetensors")) else None


def download_hub(repo_id: str, cache_dir: Path, revision: str | None = None) -> Path:
    """A hub model's safetensors snapshot; refuses clearly when offline."""
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    if offline and (cached := cached_hub(repo_id, cache_dir, revision)) is not None:
        return cached
    if offline:
        raise SftError(
            f"model {repo_id!r} looks like a hub id, but HF_HUB_OFFLINE is set, so nothing is "
            "downloaded. Download it where you are online (huggingface-cli download "
            f"{repo_id}) and set model.name_or_path to that directory, or use a built-in model "
            f"({', '.join(BUILTIN_MODELS)})"
        )
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=str(cache_dir / "hub"),
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"],
        )
    except Exception as exc:  # network, auth, missing repo: all user-facing
        raise SftError(
            f"cannot download {repo_id!r} from the Hugging Face hub: {exc}. Check the id and "
            "your network, or point model.name_or_path at a local directory"
        ) from exc
    if not any(Path(path).glob("*.safetensors")):
        raise SftError(
            f"hub model {repo_id!r} has no safetensors weights; sft loads only "
            "safetensors from the hub"
        )
    return Path(path)


def resolve(
    spec: str, cache_dir: Path, dtype: str = "float32", revision: str | None = None
) -> Path | None:
    """A local HF directory for a built-in name, `.gguf` file or hub id; None if not ours."""
    if spec in BUILTIN_MODELS:
        return convert_gguf(builtin_weights(spec), cache_dir, spec, dtype)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise SftError(f"GGUF file not found: {spec}")
        return convert_gguf(path.resolve(), cache_dir, path.stem, dtype)
    if HUB_ID.match(spec) and not path.exists():
        return download_hub(spec, cache_dir, revision)
    return None


@sft.hookimpl
def sft_resolve_model(spec: str, cache_dir: str, revision: str | None = None) -> str | None:
    found = resolve(spec, Path(cache_dir), revision=revision)
    return str(found) if found else None
