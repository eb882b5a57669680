"""`sft generate`, `sft chat` and `sft eval`, defined once for every backend that can try a
model. A backend names the modules that do the work; they are imported only when a command runs
(so `sft --help` imports no framework):

    commands = inference_commands(InferenceBackend("sft_torch.generate", "sft_torch.eval", ...))
    cli.command("generate")(commands["generate"])

The generate module provides `load_for_inference(model)`, `reply(loaded, messages, sampling)` and
`chat_loop(loaded, sampling, system)`; the eval module `evaluate_cli(model, data, compare,
json_out, max_new_tokens)`.
"""

# no `from __future__ import annotations`: typer reads these signatures, and the option types
# below are per backend (their help names what the backend loads)

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sft.inference import Sampling, with_system


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class InferenceBackend:
    generate_module: str
    """e.g. `sft_torch.generate`."""
    eval_module: str
    """e.g. `sft_torch.eval`."""
    model_help: str
    """Help of the MODEL argument of generate / chat: what the backend can load."""
    eval_model_help: str
    """Help of `sft eval --model`."""
    generate_note: str = ""
    """Appended to generate's help, e.g. " (MindFormers)"."""
    setup: Callable[[], None] = _nothing
    """Run before loading a model (threads, quiet logging)."""


def inference_commands(backend: InferenceBackend) -> dict[str, Callable[..., None]]:
    """The `generate`, `chat` and `eval` command functions of `backend`, by command name."""
    model_arg = Annotated[str, typer.Argument(help=backend.model_help)]
    max_new = Annotated[int, typer.Option(help="Most tokens to generate.")]
    temp = Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")]
    top_p_opt = Annotated[float, typer.Option(help="Nucleus sampling mass (with temperature > 0).")]

    def gen_module() -> Any:
        return importlib.import_module(backend.generate_module)

    def generate(
        model: model_arg,
        prompt: Annotated[
            list[str], typer.Option("--prompt", "-p", help="User message (repeatable).")
        ],
        system: Annotated[Optional[str], typer.Option(help="System message.")] = None,
        max_new_tokens: max_new = 128,
        temperature: temp = 0.0,
        top_p: top_p_opt = 1.0,
        seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    ) -> None:
        gen = gen_module()
        backend.setup()
        loaded = gen.load_for_inference(model)
        sampling = Sampling(max_new_tokens, temperature, top_p, seed)
        for p in prompt:
            answer = gen.reply(
                loaded, with_system(system, [{"role": "user", "content": p}]), sampling
            )
            typer.echo(answer if len(prompt) == 1 else f"> {p}\n{answer}\n")

    generate.__doc__ = (
        "Answer one or more prompts with a run's model and its own chat template"
        f"{backend.generate_note}."
    )

    def chat(
        model: model_arg,
        system: Annotated[Optional[str], typer.Option(help="System message.")] = None,
        max_new_tokens: max_new = 256,
        temperature: temp = 0.0,
        top_p: top_p_opt = 1.0,
    ) -> None:
        """Chat interactively with a run's model; history is kept, each turn stops at end of turn."""
        gen = gen_module()
        backend.setup()
        gen.chat_loop(
            gen.load_for_inference(model), Sampling(max_new_tokens, temperature, top_p), system
        )

    def eval_cmd(
        model: Annotated[str, typer.Option("--model", "-m", help=backend.eval_model_help)],
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
        json_out: Annotated[
            Optional[Path], typer.Option("--json", help="Write results here.")
        ] = None,
        max_new_tokens: max_new = 64,
    ) -> None:
        """Loss/perplexity on held-out chat data and scored generation tasks; `--compare BASE`
        prints the before/after table."""
        evaluate_cli = importlib.import_module(backend.eval_module).evaluate_cli
        backend.setup()
        evaluate_cli(model, data, compare, json_out, max_new_tokens)

    return {"generate": generate, "chat": chat, "eval": eval_cmd}
