"""`sft data ...`: prepare the tokenized cache, and look at what will be trained.

    $ sft data prepare --config configs/smollm2-135m/lora.yaml            # cache + data.json
    $ sft data prepare --config FILE --format mindrecord                   # via a backend plugin
    $ sft data stats   --config FILE                                       # counts, lengths, packing
    $ sft data inspect --config FILE --n 3                                 # trained vs masked tokens

This module imports typer only; the pipeline (transformers, numpy) loads inside the commands so
`sft --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

data_app = typer.Typer(help="Prepare, check and inspect training data.", no_args_is_help=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Job spec YAML file.")]
Overrides = Annotated[
    Optional[list[str]],
    typer.Argument(
        help="Overrides as key.sub=value (values parsed as YAML), e.g. data.max_seq_len=512"
    ),
]


def _prepared(config: Path, overrides: list[str] | None) -> tuple[Any, Any]:
    from sft.config import load_config
    from sft.data.pipeline import prepare_data
    from sft.models import resolve_model

    cfg = load_config(config, overrides or [])
    model = resolve_model(cfg.model.name_or_path, cfg.model.revision)
    run_dir = Path(cfg.output_dir) if cfg.output_dir else None
    return cfg, prepare_data(cfg, model, run_dir=run_dir)


@data_app.command("prepare", context_settings={"allow_interspersed_args": True})
def prepare(
    config: ConfigOpt,
    overrides: Overrides = None,
    format: Annotated[
        str,
        typer.Option(
            "--format", "-f", help="npy (the cache itself) or a plugin's format, e.g. mindrecord."
        ),
    ] = "npy",
) -> None:
    """Tokenize the config's data into the content-hashed cache (reused by `sft run`)."""
    from sft.errors import SftError
    from sft.plugins import get_plugins

    cfg, data = _prepared(config, overrides)
    if format == "npy":
        typer.echo(f"cache: {data.cache_dir}")
        return
    out = data.cache_dir / format
    written = get_plugins().hook.sft_write_data(fmt=format, data=data, out_dir=str(out), config=cfg)
    if written is None:
        raise SftError(
            f"no installed plugin writes data format {format!r}; built-in: npy. Backend plugins add "
            "their own (the MindSpore backend: mindrecord); `sft plugins` lists what is installed"
        )
    typer.echo(f"{format}: {written}")


@data_app.command("stats", context_settings={"allow_interspersed_args": True})
def stats(config: ConfigOpt, overrides: Overrides = None) -> None:
    """Record counts per reason, token-length percentiles and histogram, trained-token fraction
    and packing efficiency."""
    from rich.console import Console
    from rich.table import Table

    from sft.data.accounting import summary_line
    from sft.data.stats import histogram

    cfg, data = _prepared(config, overrides)
    s, console = data.stats, Console(soft_wrap=True)
    console.print(f"cache: {data.cache_dir} (template {s.get('template')})")
    table = Table("train records", "count")
    acc = s["train"]
    table.add_row("records", str(acc["records"]))
    table.add_row("[green]trained[/]", str(acc["trained"]))
    for k in ("truncated", "split"):
        if acc[k]:
            table.add_row(f"  {k}", str(acc[k]))
    for kind in ("dropped", "rejected"):
        for reason, n in acc[kind].items():
            table.add_row(f"[yellow]{kind}[/]: {reason}", str(n))
    console.print(table)
    if s.get("eval"):
        console.print(summary_line(s["eval"], "eval"))
    elif s.get("eval_samples"):
        console.print(f"eval: {s['eval_samples']} samples held out (data.eval_fraction)")
    ln = s["length"]
    console.print(
        f"samples {s['samples']}, tokens {s['tokens']}, trained {s['trained_tokens']} "
        f"({s['trained_fraction']:.1%}); length min {ln['min']} p50 {ln['p50']:.0f} "
        f"p90 {ln['p90']:.0f} p99 {ln['p99']:.0f} max {ln['max']} (max_seq_len {s['max_seq_len']})"
    )
    console.print(
        f"packing: {s['packing']['rows']} rows, efficiency {s['packing']['efficiency']:.1%}"
    )
    hist = histogram(data.train.lengths, cfg.data.max_seq_len)
    top = max(c for _, _, c in hist) or 1
    for lo, hi, c in hist:
        console.print(f"{lo:>6}-{hi:<6} {'#' * round(40 * c / top):<40} {c}")


@data_app.command("inspect", context_settings={"allow_interspersed_args": True})
def inspect(
    config: ConfigOpt,
    overrides: Overrides = None,
    n: Annotated[int, typer.Option("--n", help="How many samples to show.")] = 3,
) -> None:
    """Show the first samples token by token: trained tokens in green, masked ones dim."""
    from rich.console import Console
    from rich.text import Text

    from sft.data.cache import IGNORE_INDEX
    from sft.data.tokenizer import load_tokenizer

    _, data = _prepared(config, overrides)
    tok = load_tokenizer(data.tokenizer_dir)
    console = Console()
    for i in range(min(n, len(data.train))):
        ids, labels = data.train.sample(i)
        text = Text()
        for t, lab in zip(ids.tolist(), labels.tolist(), strict=True):
            piece = tok.decode([t])
            text.append(piece, style="bold green" if lab != IGNORE_INDEX else "dim")
        console.rule(f"sample {i}  {data.train.sources[i]}  ({len(ids)} tokens)")
        console.print(text)
    console.print("[bold green]green[/]: trained   [dim]dim[/]: masked (context only)")
