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

from sft import rundir
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
    config: Annotated[
        Optional[Path],
        typer.Option("--config", "-c", help="Job spec YAML file (or build one: --model, --data)."),
    ] = None,
    overrides: Overrides = None,
    backend: BackendOpt = None,
    resume: Annotated[
        Optional[str], typer.Option(help="`auto` (newest complete checkpoint) or a checkpoint dir.")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Validate, prepare data, write config.yaml, the native config and every "
            "node's launch commands into the run directory and print them; train nothing.",
        ),
    ] = False,
    model: Annotated[
        Optional[str],
        typer.Option(help="Model to fine-tune (built-in name, local dir, .gguf or hub id)."),
    ] = None,
    data: Annotated[
        Optional[str], typer.Option(help="Training data: a file, glob, directory or dataset id.")
    ] = None,
    method: Annotated[
        Optional[str], typer.Option(help="full, lora (the default), qlora or freeze.")
    ] = None,
) -> None:
    """Fine-tune as the job spec says. See `sft config explain` for every field.

    Without a YAML file: `sft run --model smollm2-135m-instruct --data train.jsonl [--method
    lora] [key=value ...]` builds the spec from these and the defaults, validates it the same
    way, and writes it to RUN_DIR/config.yaml, so `sft run -c RUN_DIR/config.yaml` repeats it.
    """
    from sft.run import run as run_job

    quick = quick_start_overrides(config, model, data, method, overrides or [])
    extra = quick + list(overrides or []) + ([f"checkpoint.resume={resume}"] if resume else [])
    cfg = _load(config, extra, backend) if config else _load_quick(extra, backend)
    if config is None:
        spec = rundir.config_path(Path(cfg.output_dir or "runs/run").resolve())  # run.py's default
        typer.echo(f"sft: the resolved spec is written to {spec}; repeat with: sft run -c {spec}")
    if dry_run:
        _print_dry_run(cfg)
        return
    summary = run_job(cfg)
    if summary:
        typer.echo(f"done: {summary['steps']} steps, final loss {summary['final_loss']}")
        typer.echo(f"run directory: {summary['run_dir']}")


def _print_dry_run(cfg: Any) -> None:
    from sft.run import dry_run

    result = dry_run(cfg)
    typer.echo(f"dry run: nothing trained; plan in {result['run_dir']}/plan.json")
    typer.echo(f"resolved config: {result['config']}")
    for name, path in result["files"].items():
        typer.echo(f"\n# {name}: {path}")
        if path.endswith((".yaml", ".yml", ".json")):  # the native config itself
            text = Path(path).read_text()
            typer.echo(text, nl=not text.endswith("\n"))
    for node, commands in result["commands"].items():
        typer.echo(f"\n# {node}")
        for command in commands:
            typer.echo(command)
    typer.echo("\n" + json.dumps(result["summary"], indent=2))


def quick_start_overrides(
    config: Path | None,
    model: str | None,
    data: str | None,
    method: str | None,
    overrides: list[str],
) -> list[str]:
    """`--model/--data/--method` as overrides (on top of `--config` when one is given, else
    of the defaults); without a config, `--model` and `--data` are required and the run
    directory defaults to runs/<model>-<method>."""
    given = {"model": model, "data.train": data, "method.name": method}
    out = [f"{k}={json.dumps(v)}" for k, v in given.items() if v is not None]  # JSON is YAML
    if config is not None:
        return out
    missing = [f"--{k.split('.')[0]}" for k, v in given.items() if v is None and k != "method.name"]
    if missing:
        from sft.errors import ConfigError, Problem

        raise ConfigError(
            [
                Problem(
                    " and ".join(missing),
                    "missing: sft run needs --config FILE, or --model and --data to build a "
                    "spec without one",
                    "e.g. sft run --model smollm2-135m-instruct --data train.jsonl",
                )
            ]
        )
    if not any(o.partition("=")[0].strip() == "output_dir" for o in overrides):
        name = Path(str(model).rstrip("/")).name.removesuffix(".gguf")
        run_dir = Path("runs") / f"{name}-{method or 'lora'}"
        out.append(f"output_dir={json.dumps(str(run_dir))}")
    return out


def _load_quick(overrides: list[str], backend: str | None) -> Any:
    from sft.config import load_config

    return load_config(None, overrides, backend=backend)


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
def models(
    ctx: typer.Context,
    architectures: Annotated[
        bool,
        typer.Option(
            "--architectures", help="The tested architecture matrix (per backend and export)."
        ),
    ] = False,
) -> None:
    """List built-in model names and where their weights come from."""
    from sft.models import BUILTIN_MODELS

    if ctx.invoked_subcommand is not None:
        return
    if architectures:
        from sft.archs import ARCHITECTURES

        for name, a in ARCHITECTURES.items():
            typer.echo(f"{name}  ({a.quirks})")
            typer.echo(f"    torch: {a.torch}\n    mindspore: {a.mindspore}\n    gguf: {a.gguf}")
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

    target = out or rundir.export_dir(run_dir, format)
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
