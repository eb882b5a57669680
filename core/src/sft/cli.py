"""The `sft` command line. Each command is a thin shell over a library function.

    $ sft run --config configs/smollm2-135m/lora.yaml train.max_steps=20
    $ sft config validate --config FILE      # every problem at once, exit code 2
    $ sft config explain train               # every field of a section, with its doc
    $ sft backends                           # what is installed, capabilities, install commands

User mistakes (`SftError`) print one clear message and exit 2 (config) or 1; a traceback means
a bug in sft.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
from pydantic import BaseModel

from sft.data.commands import data_app
from sft.errors import SftError

app = typer.Typer(
    name="sft",
    help="Supervised fine-tuning of LLMs: one validated job spec, PyTorch or MindSpore.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Validate, show and document job specs.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Job spec YAML file.")]
BackendOpt = Annotated[
    Optional[str], typer.Option("--backend", "-b", help="Backend to run on (overrides `backend:`).")
]
Overrides = Annotated[
    Optional[list[str]],
    typer.Argument(help="Overrides as key.sub=value (values parsed as YAML), e.g. train.lr=1e-4"),
]


def _load(config: Path, overrides: list[str] | None, backend: str | None = None) -> Any:
    from sft.config import load_config

    return load_config(config, overrides or [], backend=backend)


@app.command(context_settings={"allow_interspersed_args": True})
def run(
    config: ConfigOpt,
    overrides: Overrides = None,
    backend: BackendOpt = None,
    resume: Annotated[
        Optional[str], typer.Option(help="`auto` (newest complete checkpoint) or a checkpoint dir.")
    ] = None,
) -> None:
    """Fine-tune as the job spec says. See `sft config explain` for every field."""
    from sft.run import run as run_job

    extra = list(overrides or []) + ([f"checkpoint.resume={resume}"] if resume else [])
    cfg = _load(config, extra, backend)
    summary = run_job(cfg)
    if summary:
        typer.echo(f"done: {summary['steps']} steps, final loss {summary['final_loss']}")
        typer.echo(f"run directory: {summary['run_dir']}")


@config_app.command("validate")
def config_validate(
    config: ConfigOpt, overrides: Overrides = None, backend: BackendOpt = None
) -> None:
    """Check a job spec and report every problem at once (exit code 2 if any)."""
    cfg = _load(config, overrides, backend)
    typer.echo(f"{config}: OK (backend {cfg.backend}, method {cfg.method.name})")


@config_app.command("show")
def config_show(config: ConfigOpt, overrides: Overrides = None, backend: BackendOpt = None) -> None:
    """Print the resolved job spec: defaults filled in, paths made absolute."""
    import yaml

    from sft.run import config_to_dict

    cfg = _load(config, overrides, backend)
    typer.echo(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), nl=False)


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON schema of the job spec (for editors and validators)."""
    from sft.specs import RunConfig

    typer.echo(json.dumps(RunConfig.model_json_schema(), indent=2))


def _explain_model(model: type[BaseModel], prefix: str) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        if name == "backend_options":
            continue
        ann = field.annotation
        nested = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if nested is not None:
            lines.append(f"{prefix}{name}:  {(field.description or '').strip()}")
            lines += _explain_model(nested, prefix + "  ")
            continue
        typ = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        default = (
            "" if field.is_required() else f" = {field.get_default(call_default_factory=True)!r}"
        )
        lines.append(f"{prefix}{name}: {typ}{default}")
        for doc_line in (field.description or "").strip().splitlines():
            lines.append(f"{prefix}    {doc_line.strip()}")
    return lines


@config_app.command("explain")
def config_explain(
    section: Annotated[
        Optional[str], typer.Argument(help="model, data, method, train, ...")
    ] = None,
) -> None:
    """Document every field of the job spec (or of one section), with types and defaults."""
    from sft import specs

    if section is None:
        typer.echo("\n".join(_explain_model(specs.RunConfig, "")))
        return
    if section == "method":
        for m in (specs.FullMethod, specs.LoraMethod, specs.QLoraMethod, specs.FreezeMethod):
            typer.echo("\n".join(_explain_model(m, "")) + "\n")
        return
    field = specs.RunConfig.model_fields.get(section)
    ann = field.annotation if field else None
    if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
        from sft.plugins import get_plugins

        plugins = get_plugins()
        if section in plugins.backends:
            typer.echo("\n".join(_explain_model(plugins.backends.get(section).Options, "")))
            return
        raise SftError(
            f"no config section {section!r}; sections: {', '.join(specs.RunConfig.model_fields)}"
        )
    typer.echo("\n".join(_explain_model(ann, "")))


@app.command()
def backends() -> None:
    """List backends: installed or not, usable here or not, capabilities, install command."""
    from rich.console import Console
    from rich.table import Table

    from sft.config import KNOWN_BACKENDS
    from sft.plugins import get_plugins

    plugins = get_plugins()
    table = Table("backend", "status", "capabilities", "notes", title="sft backends")
    for name, be in plugins.backends.items():
        try:
            be.check_available()
            status, notes = "[green]ready[/]", be.description
        except SftError as exc:
            status, notes = "[yellow]installed, not usable[/]", str(exc)
        table.add_row(name, status, ", ".join(sorted(be.capabilities)), notes)
    for name, hint in KNOWN_BACKENDS.items():
        if name not in plugins.backends:
            table.add_row(name, "[red]not installed[/]", "-", f"install: {hint}")
    Console(width=160).print(table)


@app.command()
def plugins() -> None:
    """List loaded plugins and the hooks each implements."""
    from sft.plugins import get_plugins

    for name, dist, hooks in get_plugins().plugin_table():
        typer.echo(f"{name}  ({dist})\n    {', '.join(hooks) or '-'}")


models_app = typer.Typer(help="Built-in models; backends add `prepare` (convert once).")
app.add_typer(models_app, name="models")


@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context) -> None:
    """List built-in model names and where their weights come from."""
    from sft.models import BUILTIN_MODELS

    if ctx.invoked_subcommand is not None:
        return
    for m in BUILTIN_MODELS.values():
        typer.echo(f"{m.name}\n    {m.description}\n    weights: {m.filename} from `{m.install}`")


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (or an HF model dir).")],
    format: Annotated[str, typer.Option("--format", "-f", help="hf, adapter, ckpt, gguf ...")],
    out: Annotated[
        Optional[Path], typer.Option(help="Output dir (default RUN_DIR/exports/FMT).")
    ] = None,
    dtype: Annotated[
        str,
        typer.Option(
            help="f32, f16, bf16; for gguf also q8_0, q5_1, q5_0, q4_1, q4_0, "
            "q4_k_m, q5_k_m, q6_k (k-quants need llama-cpp-python)."
        ),
    ] = "f16",
) -> None:
    """Export a run (merged HF model, adapter, MindSpore ckpt, GGUF) and verify the export."""
    from sft.export import ExportRequest, run_export

    target = out or run_dir / "exports" / format
    report = run_export(
        format, ExportRequest(run_dir=run_dir.resolve(), out=target.resolve(), dtype=dtype)
    )
    typer.echo(report.to_json())
    typer.echo(f"{format} export written to {report.path} (verified)")


def _command() -> click.Command:
    from sft.plugins import get_plugins

    get_plugins().hook.sft_register_commands(cli=app)
    command: click.Command = typer.main.get_command(app)  # type: ignore[assignment]
    return command


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sft` console script; returns the exit code."""
    try:
        cmd = _command()
        cmd.main(
            args=argv if argv is not None else sys.argv[1:], prog_name="sft", standalone_mode=False
        )
    except click.exceptions.Exit as exc:
        return int(exc.exit_code or 0)
    except (click.ClickException, typer.TyperException) as exc:  # typer >= 0.2x vendors click
        exc.show()  # type: ignore[union-attr]
        return int(getattr(exc, "exit_code", 2))
    except (click.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        return 130
    except SftError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
