"""CLI commands of the torch backend (the `sft_register_commands` hook).

    $ sft models prepare smollm2-135m-instruct      # convert a built-in / .gguf once, print dir
    $ sft generate RUN_DIR|MODEL --prompt "Who are you?"
    $ sft chat RUN_DIR|MODEL
    $ sft eval --model RUN_DIR|MODEL --data held_out.jsonl --compare smollm2-135m-instruct

Each command is a thin shell over a library function; torch is imported only when one runs.
generate / chat / eval are core's (`sft.inference_commands`) over `sft_torch.generate` and
`sft_torch.eval`.
"""

from __future__ import annotations

from typing import Annotated, Any

import sft
import typer
from sft.inference_commands import InferenceBackend, inference_commands


def _threads() -> None:
    """Threads from SFT_NUM_THREADS (default torch's), and no per-tensor loading bars or
    library deprecation chatter in the middle of answers."""
    import os
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(int(os.environ.get("SFT_NUM_THREADS", "0")) or torch.get_num_threads())
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def models_prepare(
    spec: Annotated[str, typer.Argument(help="Built-in name or path to a .gguf file.")],
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16.")] = "float32",
) -> None:
    """Convert a built-in model or a .gguf file once into a cached safetensors directory."""
    from sft.errors import SftError
    from sft.paths import cache_root

    from sft_torch.model_sources import resolve

    found = resolve(spec, cache_root() / "models", dtype)
    if found is None:
        raise SftError(f"{spec!r} is not a built-in name or .gguf file (`sft models` lists names)")
    typer.echo(str(found))


COMMANDS = inference_commands(
    InferenceBackend(
        generate_module="sft_torch.generate",
        eval_module="sft_torch.eval",
        model_help="A run directory, HF model dir, .gguf file or built-in name.",
        eval_model_help="Run dir, HF dir, .gguf or name.",
        setup=_threads,
    )
)


def _group(cli: Any, name: str) -> Any:
    for info in getattr(cli, "registered_groups", []):
        if info.name == name:
            return info.typer_instance
    return None


@sft.hookimpl
def sft_register_commands(cli: Any) -> None:
    models = _group(cli, "models")
    if models is not None:
        models.command("prepare")(models_prepare)
    for name, command in COMMANDS.items():
        cli.command(name)(command)
