"""CLI commands of the torch backend (the `sft_register_commands` hook).

    $ sft models prepare smollm2-135m-instruct      # convert a built-in / .gguf once, print dir
    $ sft generate RUN_DIR|MODEL --prompt "Who are you?"
    $ sft chat RUN_DIR|MODEL
    $ sft eval --model RUN_DIR|MODEL --data held_out.jsonl --compare smollm2-135m-instruct

Each command is a thin shell over a library function; torch is imported only when one runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import sft
import typer

ModelArg = Annotated[
    str, typer.Argument(help="A run directory, HF model dir, .gguf file or built-in name.")
]
MaxNew = Annotated[int, typer.Option(help="Most tokens to generate.")]
Temp = Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass (with temperature > 0).")]


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


def generate(
    model: ModelArg,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="User message (repeatable).")],
    system: Annotated[Optional[str], typer.Option(help="System message.")] = None,
    max_new_tokens: MaxNew = 128,
    temperature: Temp = 0.0,
    top_p: TopP = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Answer one or more prompts with a run's model and its own chat template."""
    from sft_torch.generate import Sampling, load_for_inference, reply

    _threads()
    loaded = load_for_inference(model)
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    for p in prompt:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": p}
        ]
        answer = reply(loaded, messages, sampling)
        typer.echo(answer if len(prompt) == 1 else f"> {p}\n{answer}\n")


def chat(
    model: ModelArg,
    system: Annotated[Optional[str], typer.Option(help="System message.")] = None,
    max_new_tokens: MaxNew = 256,
    temperature: Temp = 0.0,
    top_p: TopP = 1.0,
) -> None:
    """Chat interactively with a run's model; history is kept, each turn stops at end of turn."""
    from sft_torch.generate import Sampling, chat_loop, load_for_inference

    _threads()
    chat_loop(load_for_inference(model), Sampling(max_new_tokens, temperature, top_p), system)


def eval_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="Run dir, HF dir, .gguf or name.")],
    data: Annotated[
        Path,
        typer.Option(
            help="jsonl: chat samples (loss) and/or generation tasks "
            "(prompt|messages + expected|contains|regex)."
        ),
    ],
    compare: Annotated[
        Optional[str], typer.Option(help="Base model to compare against (before/after table).")
    ] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write results here.")] = None,
    max_new_tokens: MaxNew = 64,
) -> None:
    """Loss/perplexity on held-out chat data and scored generation tasks; `--compare BASE`
    prints the before/after table."""
    from sft_torch.eval import evaluate_cli

    _threads()
    evaluate_cli(model, data, compare, json_out, max_new_tokens)


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
    cli.command("generate")(generate)
    cli.command("chat")(chat)
    cli.command("eval")(eval_cmd)
