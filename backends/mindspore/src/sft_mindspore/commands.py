"""CLI commands the MindSpore backend adds to `sft` (through the `sft_register_commands` hook).

    $ sft convert weights --to ckpt path/to/hf-model  out/model.ckpt
    $ sft convert weights --to hf   out/model.ckpt    hf-out/  --config-from path/to/hf-model
    $ sft generate RUN_DIR|MODEL --prompt "Who are you?"     # when the torch backend is not
    $ sft chat RUN_DIR|MODEL                                 # installed here: MindFormers'
    $ sft eval --model RUN_DIR|MODEL --data held_out.jsonl   # generation (sft_mindspore.generate)

Conversion needs the MindSpore environment (mindspore writes and reads .ckpt); names follow
MindFormers' legacy llama (llama and qwen2 models), and a round trip is bit-exact (bf16 too).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from sft.errors import SftError
from sft.inference_commands import InferenceBackend, inference_commands


def weights(
    src: Annotated[Path, typer.Argument(help="HF model dir (--to ckpt) or a .ckpt (--to hf).")],
    out: Annotated[Path, typer.Argument(help="The .ckpt file (--to ckpt) or HF dir (--to hf).")],
    to: Annotated[str, typer.Option("--to", help="ckpt or hf")],
    config_from: Annotated[
        Optional[Path],
        typer.Option(
            help="--to hf: HF dir whose config.json and tokenizer are copied beside the weights."
        ),
    ] = None,
) -> None:
    """Convert weights between HF safetensors and a MindSpore .ckpt (llama, qwen2)."""
    from sft_mindspore.weights import ckpt_to_hf, hf_to_ckpt

    if to == "ckpt":
        if not src.is_dir():
            raise SftError(f"{src}: --to ckpt converts a Hugging Face model directory")
        path = hf_to_ckpt(src, out)
    elif to == "hf":
        if not src.is_file():
            raise SftError(f"{src}: --to hf converts a .ckpt file")
        path = ckpt_to_hf(src, out, config_from)
        if config_from is None:
            typer.echo(
                "note: no --config-from given: add config.json and tokenizer files "
                "before loading with transformers",
                err=True,
            )
    else:
        raise SftError(f"--to {to!r}: use `ckpt` (HF -> MindSpore) or `hf` (MindSpore -> HF)")
    typer.echo(f"wrote {path}")


COMMANDS = inference_commands(
    InferenceBackend(
        generate_module="sft_mindspore.generate",
        eval_module="sft_mindspore.eval",
        model_help="A run directory, HF model dir or converted built-in name.",
        eval_model_help="Run dir, HF dir or name.",
        generate_note=" (MindFormers)",
    )
)


def register_commands(cli: Any) -> None:
    group = next((g.typer_instance for g in cli.registered_groups if g.name == "convert"), None)
    if group is None:
        group = typer.Typer(help="Convert weights between formats.", no_args_is_help=True)
        cli.add_typer(group, name="convert")
    group.command("weights")(weights)
    if importlib.util.find_spec("sft_torch") is not None:
        return  # the torch backend's generate / chat / eval are installed
    for name, command in COMMANDS.items():
        cli.command(name)(command)
