"""`sft run`: the one linear flow from a validated spec to a finished run directory.

    config -> backend check -> run dir + resolved config.yaml -> model (local HF dir)
      -> tokenized data (cached) -> [eval.prompts on the base model]
      -> backend.train(plan, events) -> summary.json
      -> loss.png, [eval.prompts on the trained model -> eval/report.json], [export.formats]

Run directory: config.yaml, data.json (record accounting), rejects.jsonl, metrics.jsonl,
checkpoints/step-NNNNNN/, final/ (adapter or model + tokenizer + generation_config.json),
loss.png, summary.json, eval/report.json, exports/<format>/.

The steps after training run once per job (in the launching process, or on rank 0 when the job
was started by torchrun itself), after summary.json records the trained weights: a failing export
then fails the run without losing them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from sft import archs, rundir
from sft.backend import TrainPlan
from sft.checkpoints import resolve_resume
from sft.config import backend_options
from sft.errors import SftError
from sft.events import RunEvents
from sft.plugins import Plugins, get_plugins
from sft.specs import RunConfig


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """The config as the user would write it (backend sections back at the top level)."""
    data = config.model_dump(mode="json", exclude={"backend_options"})
    for name, section in config.backend_options.items():
        data[name] = section
    return data


def write_config(config: RunConfig, path: Path) -> None:
    path.write_text(
        "# Resolved by sft; rerun with: sft run --config "
        + str(path)
        + "\n"
        + yaml.safe_dump(config_to_dict(config), sort_keys=False)
    )


def is_main_process(config: RunConfig | None = None) -> bool:
    """Rank 0 of the job: RANK (torchrun's) is 0 and, where every node runs `sft run` itself
    (msrun, rank tables), this is node 0 — so shared run-directory files are written once."""
    return os.environ.get("RANK", "0") == "0" and (config is None or config.parallel.node_rank == 0)


#: Set by a backend's launcher for the worker processes it starts (they run `sft run` again):
#: the launcher, not its workers, evaluates and exports.
WORKER_ENV = "SFT_LAUNCHED_WORKER"


def is_job_process(config: RunConfig | None = None) -> bool:
    """The one process that does the per-job work around training (prompt evals, exports)."""
    return is_main_process(config) and not os.environ.get(WORKER_ENV)


def resolve_packing(config: RunConfig, backend: Any, options: Any) -> bool:
    if config.data.packing != "auto":
        return bool(config.data.packing)
    if "packing" not in backend.capabilities:
        return False
    default = getattr(backend, "default_packing", None)
    return bool(default(options)) if default else True


def packing_notice(config: RunConfig, backend: Any, packed: bool) -> str | None:
    """What `data.packing: auto` became, said at plan time: backends resolve it differently
    (torch packs, mindspore cannot), and packed steps hold other samples than unpacked ones, so
    the same spec would otherwise train different batches on different backends unannounced."""
    if config.data.packing != "auto":
        return None
    fix = "set data.packing: false to train identical batches on every backend"
    if packed:
        return (
            f"data.packing: auto -> packed rows on backend {backend.name!r}; a backend that "
            f"does not pack (mindspore) trains this spec with other samples per step: {fix}"
        )
    return (
        f"data.packing: auto -> no packing on backend {backend.name!r}; a backend that packs "
        f"(torch) trains this spec with other samples per step: {fix}"
    )


def build_plan(config: RunConfig, plugins: Plugins | None = None) -> tuple[TrainPlan, Any]:
    """Everything before training: returns the plan and the backend that will run it."""
    from sft.data.pipeline import prepare_data
    from sft.models import resolve_model

    plugins = plugins or get_plugins()
    backend = plugins.backends.get(config.backend)
    backend.check_available()
    options = backend_options(config, plugins)
    run_dir = Path(config.output_dir or "runs/run").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process(config):
        write_config(config, rundir.config_path(run_dir))
    model = resolve_model(config.model.name_or_path, config.model.revision)
    arch_notice = archs.notice(model.model_type, config.backend)
    if arch_notice and is_main_process():
        print(f"warning: {arch_notice}", file=sys.stderr, flush=True)
    data = prepare_data(config, model, run_dir=run_dir)
    packing = resolve_packing(config, backend, options)
    notice = packing_notice(config, backend, packing)
    if notice and is_main_process():
        print(f"note: {notice}", file=sys.stderr, flush=True)
    plan = TrainPlan(
        config=config,
        options=options,
        run_dir=run_dir,
        model=model,
        data=data,
        resume_from=resolve_resume(config.checkpoint.resume, run_dir),
        packing=packing,
    )
    return plan, backend


def run(config: RunConfig, plugins: Plugins | None = None) -> dict[str, Any]:
    """Train as the config says; returns the contents of summary.json."""
    plugins = plugins or get_plugins()
    start = time.time()
    finished = finished_run(config)
    if finished is not None:
        return finished
    plan, backend = build_plan(config, plugins)
    if is_main_process(config):  # until this run finishes, the run directory is not finished
        rundir.summary_path(plan.run_dir).unlink(missing_ok=True)
    job = is_job_process(config)
    before = evaluate_prompts(backend, config, str(plan.model.path)) if job else None
    events = RunEvents(config, plan.run_dir, plugins.hook, is_main=is_main_process(config))
    result = backend.train(plan, events)
    summary: dict[str, Any] = {
        "backend": config.backend,
        "model": config.model.name_or_path,
        "method": config.method.name,
        "run_dir": str(plan.run_dir),
        "steps": result.steps,
        "final_loss": result.final_loss,
        "outputs": result.outputs,
        "metrics": result.metrics,
        "data": plan.data.stats,
        "data_cache": str(plan.data.cache_dir),
        "packing": plan.packing,
        "resumed_from": str(plan.resume_from) if plan.resume_from else None,
        "wall_time_s": round(time.time() - start, 2),
    }
    if not is_main_process(config):
        return summary
    summary_path = rundir.summary_path(plan.run_dir)
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    if job:
        summary["outputs"].update(after_training(config, plan.run_dir, backend, before))
        summary["wall_time_s"] = round(time.time() - start, 2)
        summary_path.write_text(json.dumps(summary, indent=2, default=str))
    events.train_end(summary)
    return summary


def finished_run(config: RunConfig) -> dict[str, Any] | None:
    """`checkpoint.resume: auto` on a run directory whose run already finished with the same
    config (its summary.json is written last, and removed when a run starts): say so and return
    that summary instead of training again. None when there is something to do."""
    if config.checkpoint.resume != "auto":
        return None
    run_dir = Path(config.output_dir or "runs/run").resolve()
    summary_path, config_path = rundir.summary_path(run_dir), rundir.config_path(run_dir)
    if not (summary_path.is_file() and config_path.is_file()):
        return None
    try:
        summary: dict[str, Any] = json.loads(summary_path.read_text())
        before = yaml.safe_load(config_path.read_text())
    except (ValueError, yaml.YAMLError):
        return None
    now = yaml.safe_load(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    for doc in (before, now):
        if isinstance(doc, dict) and isinstance(doc.get("checkpoint"), dict):
            doc["checkpoint"].pop("resume", None)
    if before != now:
        return None  # e.g. more max_steps: resume and train the new steps
    if is_main_process(config):
        print(
            f"sft: {run_dir} already finished ({summary.get('steps')} steps, final loss "
            f"{summary.get('final_loss')}); nothing to resume. Its outputs: {summary_path}. "
            "To train again, run without --resume or with another output_dir.",
            file=sys.stderr,
            flush=True,
        )
    return summary


def evaluate_prompts(backend: Any, config: RunConfig, model: str) -> dict[str, Any] | None:
    """`eval.prompts` scored on `model` with the backend's generation (None without prompts)."""
    if not config.eval.prompts:
        return None
    evaluate = getattr(backend, "evaluate", None)
    if evaluate is None:  # validation refuses eval.prompts for such a backend; never skip it
        raise SftError(f"eval.prompts: backend {config.backend!r} cannot generate")
    print(f"sft: eval.prompts on {model} ({config.eval.prompts})", file=sys.stderr, flush=True)
    result: dict[str, Any] = evaluate(model, Path(config.eval.prompts), config.eval.max_new_tokens)
    return result


def after_training(
    config: RunConfig, run_dir: Path, backend: Any, before: dict[str, Any] | None
) -> dict[str, str]:
    """The loss plot, the before/after prompt report and the exports of a finished run; returns
    their paths by name for summary.json's `outputs`."""
    from sft.evalreport import write_report
    from sft.plot import plot_loss

    outputs: dict[str, str] = {}
    if config.logging.plot:
        png = plot_loss(run_dir)
        if png is not None:
            outputs["loss_plot"] = str(png)
        else:
            print("sft: no loss.png (needs matplotlib: pip install matplotlib)", file=sys.stderr)
    if before is not None:
        after = evaluate_prompts(backend, config, str(run_dir))
        assert after is not None
        outputs["eval_report"] = str(write_report(run_dir, before, after))
    for fmt in config.export.formats:
        outputs[f"export_{fmt}"] = export_after_training(config, run_dir, fmt)
    return outputs


def export_dtype(fmt: str, dtype: str) -> str:
    """The dtype `fmt` is written in: `export.dtype`, except that a GGUF quantization (q8_0)
    applies to the gguf export only and the other formats are then written in f16."""
    return dtype if fmt == "gguf" or not dtype.startswith("q") else "f16"


def export_after_training(config: RunConfig, run_dir: Path, fmt: str) -> str:
    """One `export.formats` entry, through the same code path as `sft export`."""
    from sft.export import ExportRequest, run_export

    dtype = export_dtype(fmt, config.export.dtype)
    out = rundir.export_dir(run_dir, fmt)
    try:
        report = run_export(fmt, ExportRequest(run_dir=run_dir, out=out, dtype=dtype))
    except SftError as exc:
        raise SftError(
            f"training finished and its weights are in {rundir.final_dir(run_dir)}, but export "
            f"{fmt!r} ({dtype}) failed: {exc}. Retry it with: sft export {run_dir} --format "
            f"{fmt} --dtype {dtype}"
        ) from exc
    print(f"sft: {fmt} export ({dtype}) written to {report.path} (verified)", file=sys.stderr)
    return str(report.path)


def dry_run(config: RunConfig, plugins: Plugins | None = None) -> dict[str, Any]:
    """`sft run --dry-run`: resolve and validate everything, write config.yaml and the
    backend's native plan (`backend.plan_native(plan)`, optional: native config files and the
    launch commands of every node), train nothing. Returns what RUN_DIR/plan.json holds."""
    plan, backend = build_plan(config, plugins)
    native = getattr(backend, "plan_native", None)
    out: dict[str, Any] = native(plan) if native else {}
    result = {
        "backend": config.backend,
        "run_dir": str(plan.run_dir),
        "config": str(rundir.config_path(plan.run_dir)),
        "files": out.get("files", {}),
        "commands": out.get("commands", {}),
        "summary": {
            "packing": plan.packing,
            "samples": len(plan.data.train),
            **out.get("summary", {}),
        },
    }
    if is_main_process(config):
        (plan.run_dir / "plan.json").write_text(json.dumps(result, indent=2, default=str))
    return result
