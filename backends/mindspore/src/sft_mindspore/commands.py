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


ModelArg = Annotated[
    str, typer.Argument(help="A run directory, HF model dir or converted built-in name.")
]
MaxNew = Annotated[int, typer.Option(help="Most tokens to generate.")]
Temp = Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass (with temperature > 0).")]


def generate(
    model: ModelArg,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="User message (repeatable).")],
    system: Annotated[Optional[str], typer.Option(help="System message.")] = None,
    max_new_tokens: MaxNew = 128,
    temperature: Temp = 0.0,
    top_p: TopP = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Answer one or more prompts with a run's model and its own chat template (MindFormers)."""
    from sft_mindspore.generate import Sampling, load_for_inference, reply

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
    from sft_mindspore.generate import Sampling, chat_loop, load_for_inference

    chat_loop(load_for_inference(model), Sampling(max_new_tokens, temperature, top_p), system)


def eval_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="Run dir, HF dir or name.")],
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
    from sft_mindspore.eval import evaluate_cli

    evaluate_cli(model, data, compare, json_out, max_new_tokens)


def register_commands(cli: Any) -> None:
    group = next((g.typer_instance for g in cli.registered_groups if g.name == "convert"), None)
    if group is None:
        group = typer.Typer(help="Convert weights between formats.", no_args_is_help=True)
        cli.add_typer(group, name="convert")
    group.command("weights")(weights)
    if importlib.util.find_spec("sft_torch") is not None:
        return  # the torch backend's generate / chat / eval are installed
    cli.command("generate")(generate)
    cli.command("chat")(chat)
    cli.command("eval")(eval_cmd)
