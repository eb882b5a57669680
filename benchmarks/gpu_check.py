"""The torch backend on a real GPU (issue #20): one PASS / FAIL / SKIP line per check, about
8 minutes on one H200, tiny models built here, nothing downloaded.

    $ make gpu-wheels                               # once, with network: the pure-python wheels
                                                    # (and pydantic-core for cp312) into .whl/gpu
    $ make gpu-check                                # on the GPU machine: python3 this script
    $ python benchmarks/gpu_check.py --dry-run      # its CPU-side parts, on any machine
    $ python benchmarks/gpu_check.py --only packed-equals-unpacked,checkpoint-resume
    $ python benchmarks/gpu_check.py --check-bundle # working tree + .whl/gpu fit the 64 MiB carry

The GPU image has torch, transformers, peft and accelerate but no pydantic, typer or pluggy and
no network: missing packages are unpacked from .whl/gpu into a temporary directory and put on
sys.path, and sft's `torch` entry point is declared there, so nothing is installed. The checks
run through sft's public entry points (`sft.run.run`, `sft bench`'s `run_bench`, the `hf`
exporter) or the loop's `Trainer`, so they test whatever the merged tree does.

Checks (issue #20 item numbers): precision-decision (1, 3), master-weights (1), fp16-loss-scaling
(7), fp16-weights (7), qlora-export (8; SKIP without bitsandbytes), packed-equals-unpacked (2,
10), flash-attention-packed (2; SKIP without flash-attn), chunked-loss, grad-accumulation,
checkpoint-resume, bench-mfu (9), bench-smollm2-lora / bench-smollm2-full (SKIP when the
built-in SmolLM2 is not installed). Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl" / "gpu"
SOURCES = [
    "core/src",
    "backends/torch/src",
    "plugins/gguf/src",
    "plugins/example-backend/src",
    "plugins/tensorboard/src",
    "",  # tests.tiny: the tiny models
]
BUNDLE_LIMIT = 64 * 2**20  # what the device tool carries: working tree + ignored paths
QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Tell me a joke about cats.", "Cats sleep all day, then knock things over."),
    ("Translate to German: good morning.", "Guten Morgen."),
    ("Write a haiku about the sea.", "Waves fold into foam, salt wind carries gull voices."),
    ("Hello!", "Hello! How can I help you today?"),
    ("Summarize: the meeting moved to Tuesday.", "The meeting is on Tuesday."),
]


# ------------------------------------------------------------------------------ bootstrap


def bootstrap(site: Path) -> None:
    """Make sft importable from this tree without installing anything (see module doc)."""
    for src in reversed(SOURCES):
        sys.path.insert(0, str(REPO / src))
    try:
        import pluggy  # noqa: F401
        import pydantic  # noqa: F401
        import typer  # noqa: F401
    except ImportError:
        wheels = sorted(WHEELS.glob("*.whl"))
        if not wheels:
            raise SystemExit(
                f"gpu_check: pydantic/typer/pluggy are missing and {WHEELS} has no wheels; "
                "run `make gpu-wheels` on a machine with network and carry .whl/gpu"
            ) from None
        for wheel in wheels:  # a wheel is a zip of what site-packages would hold
            with zipfile.ZipFile(wheel) as z:
                z.extractall(site)
        sys.path.insert(0, str(site))
    from importlib.metadata import entry_points

    if not any(ep.name == "torch" for ep in entry_points(group="sft")):
        info = site / "sft_gpu_check-0.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sft-gpu-check\nVersion: 0\n")
        (info / "entry_points.txt").write_text("[sft]\ntorch = sft_torch.plugin\n")
        if str(site) not in sys.path:
            sys.path.insert(0, str(site))
    importlib.invalidate_caches()


def bundle_size() -> tuple[int, int]:
    """(bytes of the working tree as the device tool copies it: tracked and untracked files git
    does not ignore, bytes of .whl/gpu)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    tree = sum(
        (REPO / p).stat().st_size
        for p in out.decode().split("\0")
        if p and (REPO / p).is_file() and not (REPO / p).is_symlink()
    )
    wheels = sum(p.stat().st_size for p in WHEELS.glob("*") if p.is_file())
    return tree, wheels


# ------------------------------------------------------------------------------ fixtures


@dataclass
class Ctx:
    device: str
    """"cuda", or "cpu" in a dry run."""
    tmp: Path
    model: Path
    data: Path

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def write_data(path: Path, repeats: int = 6, limit: int | None = None) -> Path:
    rows = [(i, q, a) for i in range(repeats) for q, a in QA][:limit]
    with path.open("w") as f:
        for i, q, a in rows:
            msgs = [{"role": "user", "content": f"{q} ({i})"}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def job(ctx: Ctx, name: str, **sections: Any) -> Path:
    """A job spec for the tiny model; `sections` update its top-level sections."""
    import yaml

    spec: dict[str, Any] = {
        "model": {"name_or_path": str(ctx.model)},
        "data": {
            "train": str(ctx.data),
            "max_seq_len": 128,
            "eval_fraction": 0,
            "group_by_length": False,
        },
        "method": {"name": "lora", "r": 4, "dropout": 0.0},  # no masks: runs compare exactly
        "train": {
            "max_steps": 4,
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "learning_rate": 5e-3,
            "precision": "fp32",
            "warmup_steps": 0,
            "deterministic": True,
        },
        "checkpoint": {"every_steps": None},
        "logging": {"progress": False, "plot": False},
        "output_dir": str(ctx.tmp / name / "run"),
        "torch": {"device": ctx.device},
    }
    for key, value in sections.items():  # a method is replaced, other sections updated
        merge = isinstance(value, dict) and key != "method"
        spec[key] = {**spec[key], **value} if merge else value
    path = ctx.tmp / name / "job.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def sft_run(path: Path, overrides: list[str] | None = None) -> tuple[dict[str, Any], list[float]]:
    """`sft run` in-process: (summary, per-step training losses)."""
    from sft.config import load_config
    from sft.events import read_metrics
    from sft.run import run

    summary = run(load_config(path, overrides or []))
    rows = read_metrics(Path(summary["run_dir"]))
    return summary, [r["loss"] for r in rows if "loss" in r and "eval_loss" not in r]


def trainer_for(path: Path, overrides: list[str] | None = None) -> Any:
    """The loop's Trainer for a job (as `sft run` builds it), to inspect weights and state."""
    from sft.config import load_config
    from sft.events import RunEvents
    from sft.plugins import get_plugins
    from sft.run import build_plan
    from sft_torch.train import Trainer

    cfg = load_config(path, overrides or [])
    plugins = get_plugins()
    plan, _ = build_plan(cfg, plugins)
    return Trainer(plan, RunEvents(cfg, plan.run_dir, plugins.hook))


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def max_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return float("inf")
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


Result = tuple[str, str]


# ------------------------------------------------------------------------------ checks


def check_precision_decision(ctx: Ctx) -> Result:
    """Items 1, 3: auto -> bf16 on native-bf16 GPUs, fp16 (loss scaling) on T4/V100; fp32
    master weights whatever the device."""
    import torch
    from sft_torch import runtime
    from sft_torch.model import weights_dtype

    if weights_dtype("auto") != torch.float32:
        return "FAIL", f"model.dtype auto loads {weights_dtype('auto')}"
    if ctx.cuda:
        cap = torch.cuda.get_device_capability()
        want = "bf16" if cap >= (8, 0) else "fp16"
        got = runtime.resolve_precision("auto", torch.device("cuda"))
        name = torch.cuda.get_device_name()
        return ("PASS" if got == want else "FAIL"), f"{name} (cc {cap}): auto -> {got}"
    seen = {}
    for native in (True, False):  # a faked A100 / T4: torch counts emulated bf16 by default
        with (
            patched(torch.cuda, "is_available", lambda: True),
            patched(
                torch.cuda,
                "is_bf16_supported",
                lambda including_emulation=True, n=native: n or including_emulation,
            ),
        ):
            seen[native] = runtime.resolve_precision("auto", torch.device("cuda"))
    ok = seen == {True: "bf16", False: "fp16"}
    return (
        "PASS" if ok else "FAIL"
    ), f"faked GPUs: native bf16 -> {seen[True]}, T4 -> {seen[False]}"


def unchanged_fraction(trainer: Any) -> float:
    """Fraction of weights whose value (bf16 + carried compensation) never changed."""
    from sft_torch.train import fit

    before = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()}
    fit(trainer)
    same = total = 0
    for n, p in trainer.model.named_parameters():
        comp = trainer.optimizer.state.get(p, {}).get("compensation")
        now = p.detach().float() + (0 if comp is None else comp.float())
        same += int((now == before[n]).sum())
        total += p.numel()
    return same / total


def check_master_weights(ctx: Ctx) -> Result:
    """Item 1: full fine-tuning at lr 5e-5 with bf16 compute moves every weight that gets a
    gradient, with fp32 masters (auto) or pure bf16 + compensated AdamW; the control (torch's
    AdamW on bf16 weights) leaves many where they were."""
    import torch
    from sft_torch import train as train_mod
    from sft_torch.optim import CompensatedAdamW

    train = {"max_steps": 12, "learning_rate": 5e-5, "precision": "bf16"}
    fracs, kinds = {}, {}
    for mode in ("auto", "bfloat16", "plain"):
        path = job(ctx, f"master-{mode}", method="full", train=train)
        dtype = "auto" if mode == "auto" else "bfloat16"
        plain = lambda model, tr: torch.optim.AdamW(  # noqa: E731
            [p for p in model.parameters() if p.requires_grad], lr=tr.learning_rate
        )
        with contextlib.ExitStack() as stack:
            if mode == "plain":
                stack.enter_context(patched(train_mod, "build_optimizer", plain))
            trainer = trainer_for(path, [f"model.dtype={dtype}"])
            kinds[mode] = (next(trainer.model.parameters()).dtype, type(trainer.optimizer))
            fracs[mode] = unchanged_fraction(trainer)
    ok = (
        kinds["auto"] == (torch.float32, torch.optim.AdamW)
        and kinds["bfloat16"] == (torch.bfloat16, CompensatedAdamW)
        and fracs["bfloat16"] < fracs["auto"] + 0.05
        and fracs["plain"] > fracs["auto"] + 0.3
    )
    detail = ", ".join(f"{k} {v:.3f}" for k, v in fracs.items())
    return ("PASS" if ok else "FAIL"), f"weights unchanged after 12 steps: {detail}"


@contextlib.contextmanager
def fp16(ctx: Ctx, init_scale: float) -> Iterator[None]:
    """fp16 with a loss scale large enough to overflow the first steps. On CPU (dry run) the
    resolved precision is forced: validation refuses fp16 there, torch runs it."""
    from sft_torch import runtime
    from sft_torch import train as train_mod

    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(train_mod, "INIT_LOSS_SCALE", init_scale))
        if not ctx.cuda:
            stack.enter_context(patched(runtime, "resolve_precision", lambda *a, **k: "fp16"))
        yield


def check_fp16_loss_scaling(ctx: Ctx) -> Result:
    """Item 7: skipped (overflowed) steps are counted and do not advance the LR schedule; a
    resumed run restores the loss scale (same skips, same weights)."""
    from sft.checkpoints import complete_checkpoints
    from sft_torch.train import fit

    train = {
        "max_steps": 14,
        "precision": "fp16" if ctx.cuda else "fp32",
        "lr_scheduler": "linear",
        "max_consecutive_skips": 20,
    }
    ck = {"every_steps": 8, "keep_last": 3}
    with fp16(ctx, 2.0**24):
        full = trainer_for(job(ctx, "fp16-a", method="full", train=train, checkpoint=ck))
        result = fit(full)
        skipped = result.metrics["skipped_steps"]
        ckpt = complete_checkpoints(full.plan.run_dir)[0]
        resumed = trainer_for(
            job(ctx, "fp16-b", method="full", train=train, checkpoint=ck),
            [f"checkpoint.resume={ckpt}"],
        )
        again = fit(resumed).metrics["skipped_steps"]
    diff = max(
        float((a.float() - b.float()).abs().max())
        for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True)
    )
    ok = (
        full.precision == "fp16"
        and bool(skipped)
        and full.scheduler.last_epoch == 14 - len(skipped)
        and again == [s for s in skipped if s > 8]
        and resumed.scaler.get_scale() == full.scaler.get_scale()
        and diff <= (1e-5 if ctx.cuda else 0.0)
    )
    return ("PASS" if ok else "FAIL"), (
        f"skipped {skipped}, LR steps {full.scheduler.last_epoch}/14, resumed skips {again}, "
        f"scale {full.scaler.get_scale():g}, resumed max |w diff| {diff:.2e}"
    )


def check_fp16_weights(ctx: Ctx) -> Result:
    """Item 7: model.dtype float16 + freeze trains (fp32 masters for the trained layer)."""
    import torch
    from sft_torch.train import fit

    train = {"max_steps": 3, "precision": "fp16" if ctx.cuda else "auto"}
    method = {"name": "freeze", "trainable_layers": 1}
    # dry run: validation refuses float16 with torch.device cpu, so the device is left to auto
    device = [] if ctx.cuda else ["torch.device=auto"]
    with fp16(ctx, 2.0**8):
        trainer = trainer_for(
            job(ctx, "fp16-weights", method=method, train=train), ["model.dtype=float16", *device]
        )
        result = fit(trainer)
    trained = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    ok = trained == {torch.float32} and frozen == {torch.float16} and result.final_loss is not None
    return (
        "PASS" if ok else "FAIL"
    ), f"trained {trained}, frozen {frozen}, loss {result.final_loss}"


def check_qlora_export(ctx: Ctx) -> Result:
    """Item 8: a QLoRA run's hf export is merged into the dequantized 4-bit weights and agrees
    with the quantized model as trained."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "SKIP", "bitsandbytes is not installed (pip install bitsandbytes)"
    if not ctx.cuda:
        return "SKIP", "dry run: QLoRA needs CUDA"
    from sft.export import ExportRequest, run_export

    path = job(ctx, "qlora", method={"name": "qlora", "r": 4}, train={"precision": "bf16"})
    summary, _ = sft_run(path)
    out = ctx.tmp / "qlora" / "hf"
    report = run_export("hf", ExportRequest(run_dir=Path(summary["run_dir"]), out=out, dtype="f32"))
    q = report.checks.get("quantized_model", {})
    return ("PASS" if report.ok and q else "FAIL"), (
        f"merge vs dequantized base max |diff| {report.checks['max_abs_logit_diff']:.2e}; vs the "
        f"4-bit model mean KL {q.get('mean_kl', float('nan')):.2e} (< {q.get('kl_tolerance')})"
    )


def compare_runs(
    ctx: Ctx, name: str, a: list[str], b: list[str], tol: float, **sections: Any
) -> Result:
    """The same job with two sets of overrides: per-step losses must agree within `tol`."""
    path = job(ctx, name, **sections)
    sa, la = sft_run(path, [*a, f"output_dir={ctx.tmp / name / 'a'}"])
    _, lb = sft_run(path, [*b, f"output_dir={ctx.tmp / name / 'b'}"])
    diff = max_diff(la, lb)
    modes = f"packed_attention {sa['metrics'].get('packed_attention')}"
    return ("PASS" if diff <= tol and la else "FAIL"), (
        f"{len(la)} steps, max |loss diff| {diff:.2e} (tol {tol:g}); {modes}; "
        f"{sa['metrics'].get('tokens_per_s', 0):.0f} tok/s"
    )


#: packed and padded layouts group samples into rows differently; with the whole data set in
#: every step (8 samples, global batch 8) the losses must agree step by step
WHOLE_DATA_STEPS = {"global_batch_size": 8, "gradient_accumulation_steps": None}


def check_packed(ctx: Ctx) -> Result:
    """Items 2, 10 (sdpa): packed rows (micro-batches of 2) give the unpacked losses."""
    data = write_data(ctx.tmp / "eight.jsonl", limit=8)
    return compare_runs(
        ctx,
        "packed",
        ["data.packing=true"],
        ["data.packing=false"],
        1e-4,
        data={"train": str(data)},
        train=WHOLE_DATA_STEPS,
    )


def check_flash_packed(ctx: Ctx) -> Result:
    """Item 2: flash_attention_2 with packing and micro_batch_size 2: no attention across
    samples (losses equal the unpacked run's), or a clear refusal at validation."""
    if importlib.util.find_spec("flash_attn") is None:
        return "SKIP", "flash-attn is not installed"
    if not ctx.cuda:
        return "SKIP", "dry run: flash attention needs CUDA"
    from sft.errors import ConfigError

    flash = ["torch.attn_implementation=flash_attention_2", "torch.packed_attention=position_ids"]
    data = write_data(ctx.tmp / "eight.jsonl", limit=8)
    try:
        return compare_runs(
            ctx,
            "flash",
            [*flash, "data.packing=true"],
            [*flash, "data.packing=false"],
            2e-2,
            data={"train": str(data)},
            train={**WHOLE_DATA_STEPS, "precision": "bf16"},
        )
    except ConfigError as exc:
        return "PASS", f"refused at validation: {str(exc).splitlines()[-1]}"


def check_chunked(ctx: Ctx) -> Result:
    return compare_runs(
        ctx,
        "chunked",
        ["torch.chunked_loss=true", "data.packing=false"],
        ["torch.chunked_loss=false", "data.packing=false"],
        1e-4,
    )


def check_ga(ctx: Ctx) -> Result:
    """Gradient accumulation: 4 rows as 1 micro-batch or as 4 accumulated ones."""
    return compare_runs(
        ctx,
        "ga",
        ["train.micro_batch_size=4", "train.gradient_accumulation_steps=1", "data.packing=false"],
        ["train.micro_batch_size=1", "train.gradient_accumulation_steps=4", "data.packing=false"],
        1e-4,
    )


def check_resume(ctx: Ctx) -> Result:
    """A run resumed from the step-3 checkpoint continues with the uninterrupted run's losses."""
    path = job(ctx, "resume", train={"max_steps": 6}, checkpoint={"every_steps": 3})
    _, full = sft_run(path, [f"output_dir={ctx.tmp / 'resume' / 'a'}"])
    ckpt = ctx.tmp / "resume" / "a" / "checkpoints" / "step-000003"
    summary, resumed = sft_run(
        path, [f"output_dir={ctx.tmp / 'resume' / 'b'}", f"checkpoint.resume={ckpt}"]
    )
    at = summary["metrics"].get("resumed_at_step")
    diff = max_diff(full[3:], resumed)
    tol = 1e-5 if ctx.cuda else 0.0
    ok = at == 3 and len(resumed) == 3 and diff <= tol
    return ("PASS" if ok else "FAIL"), f"resumed at step {at}, steps 4-6 max |loss diff| {diff:.2e}"


def check_bench(ctx: Ctx) -> Result:
    """Item 9: `sft bench` on the tiny model: MFU against the device's dense peak, the GEMM
    probe in the run's precision and within reach of the datasheet."""
    from sft_torch.bench import format_report, peak_flops, run_bench

    train = {"precision": "bf16" if ctx.cuda else "fp32", "max_steps": 6}
    r = run_bench(
        job(ctx, "bench", train=train, method="full"), 6, probe_seconds=0.3 if ctx.cuda else 0.1
    )
    print(format_report(r), flush=True)
    if not ctx.cuda:
        ok = r["mfu"] is None and r["gemm_fraction"] > 0
        return ("PASS" if ok else "FAIL"), f"CPU: gemm fraction {r['gemm_fraction']:.3f}, no MFU"
    peak = peak_flops(r["device_name"], r["compute"])
    probe = r["gemm_flops"][r["compute"]]
    ok = (
        peak is not None
        and r["mfu"] is not None
        and 0 < r["mfu"] < 1
        and 0.3 < probe / peak < 1.1
        and 0 < r["gemm_fraction"] < 1.2
    )
    return ("PASS" if ok else "FAIL"), (
        f"{r['device_name']} {r['compute']}: probe {probe / 1e12:.0f} TFLOP/s = "
        f"{100 * probe / (peak or float('nan')):.0f}% of peak; MFU {r['mfu']}"
    )


def check_smollm2(method: str) -> Callable[[Ctx], Result]:
    def check(ctx: Ctx) -> Result:
        from sft.models import resolve_model
        from sft_torch.bench import run_bench

        if not ctx.cuda:
            return "SKIP", "dry run: SmolLM2 benches run on the GPU only"
        try:
            resolve_model("smollm2-135m-instruct")
        except Exception as exc:  # not installed on this machine
            return "SKIP", f"SmolLM2-135M not available here: {exc}"
        cfg = REPO / "configs" / "smollm2-135m" / f"{method}.yaml"
        r = run_bench(cfg, 8, [f"output_dir={ctx.tmp / 'smol' / method}", "torch.device=cuda"])
        ok = r["mfu"] is not None and 0 < r["mfu"] < 1
        return ("PASS" if ok else "FAIL"), (
            f"{r['trained_tokens_per_s']:.0f} trained tok/s, {r['processed_tokens_per_s']:.0f} "
            f"tok/s, peak {r.get('peak_device_mib', 0):.0f} MiB, MFU {r['mfu']}"
        )

    return check


CHECKS: dict[str, Callable[[Ctx], Result]] = {
    "precision-decision": check_precision_decision,
    "master-weights": check_master_weights,
    "fp16-loss-scaling": check_fp16_loss_scaling,
    "fp16-weights": check_fp16_weights,
    "qlora-export": check_qlora_export,
    "packed-equals-unpacked": check_packed,
    "flash-attention-packed": check_flash_packed,
    "chunked-loss": check_chunked,
    "grad-accumulation": check_ga,
    "checkpoint-resume": check_resume,
    "bench-mfu": check_bench,
    "bench-smollm2-lora": check_smollm2("lora"),
    "bench-smollm2-full": check_smollm2("full"),
}


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="run on CPU: the CPU-side parts")
    ap.add_argument("--only", default="", help="comma-separated check names")
    ap.add_argument("--check-bundle", action="store_true", help="working tree + wheels <= 64 MiB")
    args = ap.parse_args(argv)
    if args.check_bundle:
        tree, wheels = bundle_size()
        ok = tree + wheels <= BUNDLE_LIMIT
        print(
            f"{'PASS' if ok else 'FAIL'} bundle: working tree {tree / 2**20:.1f} MiB + "
            f".whl/gpu {wheels / 2**20:.1f} MiB <= {BUNDLE_LIMIT / 2**20:.0f} MiB"
        )
        return 0 if ok else 1
    names = [n for n in args.only.split(",") if n] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        ap.error(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="sft-gpu-check-") as tmp_dir:
        tmp = Path(tmp_dir)
        os.environ["SFT_CACHE_DIR"] = str(tmp / "cache")
        bootstrap(tmp / "site")
        import torch

        from tests.tiny import make_model

        if not args.dry_run and not torch.cuda.is_available():
            print("FAIL cuda: torch sees no CUDA GPU (use --dry-run on a CPU machine)")
            return 1
        ctx = Ctx(
            "cpu" if args.dry_run else "cuda",
            tmp,
            make_model(tmp / "tiny-llama"),
            write_data(tmp / "train.jsonl"),
        )
        torch.set_num_threads(min(torch.get_num_threads(), 4))
        print(f"torch {torch.__version__}, device {ctx.device}", flush=True)
        failed = 0
        for name in names:
            t0 = time.perf_counter()
            try:
                status, detail = CHECKS[name](ctx)
            except Exception as exc:  # one line per check, the traceback after it
                status, detail = "FAIL", f"{type(exc).__name__}: {exc}".replace("\n", " ")
                traceback.print_exc(file=sys.stderr)
            failed += status == "FAIL"
            print(f"{status} {name}: {detail} [{time.perf_counter() - t0:.1f} s]", flush=True)
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
