"""The MindSpore path's speed (issue #19, target 5): the MindFormers run `sft run --backend
mindspore` generates, next to the same MindFormers YAML launched by hand, and the torch backend
on the same config and CPU.

    $ make bench-ms
    $ .venvs/ms/bin/python benchmarks/ms_bench.py --steps 12 --repeats 2 --threads 1 \\
          --torch-python .venvs/torch/bin/python --json benchmarks/results/ms_bench-avx2.json

Runs, each a fresh process, interleaved so that a shared machine's drift hits both sides alike
(default order: sft, by hand, sft, by hand, torch):

    sft    `sft run --backend mindspore` (sft's CLI in a child process of the MindSpore
           environment, in a fresh run directory) with its phases stamped: config + data plan,
           step schedule, MindRecord, HF -> ckpt weight conversion, YAML, the MindFormers
           worker, export. The stamps come from wrappers around the functions sft calls by
           those names (`sft.run.build_plan`, `sft_mindspore.data.build_schedule` /
           `write_training_data`, `sft_mindspore.train.hf_to_ckpt` / `launch` / `export_final`,
           `sft_mindspore.mfconfig.build_yaml`); a name sft no longer calls is reported missing.
    hand   the YAML that run wrote (RUN_DIR/mindformers.yaml, unchanged, with its MindRecord
           and initial checkpoint) launched as a MindFormers user would: MindFormers'
           run_mindformer.py is not in the 1.9.0 wheel, so its core, `MindFormerConfig(yaml)` ->
           `build_context` -> `Trainer(config).train()`, with `output_dir` set to a directory of
           its own (run_mindformer.py's --output_dir), after importing `sft_mindspore.lr` (the
           YAML's lr_schedule class) and applying `sft_mindspore.cpu_compat`'s runtime patches
           (MindFormers 1.9 does not train on CPU without them). No sft process around it: the
           worker's output goes straight to a file, no live reader, no sft callbacks.
    torch  `sft bench` of the torch backend on the same config and overrides (its steady state
           recomputed over the same steps as the MindSpore runs').

Step times come from the worker's own log, the same way for sft and by hand: the wall time
between MindFormers' consecutive per-step lines (their timestamps, ms), and MindFormers'
`per_step_time`. Steady state = the steps after `--warmup` (the first includes the graph
compile). Tokens per step are the non-padding tokens sft's schedule put in each step (from the
run's metrics.jsonl; the by-hand run trains the same MindRecord, checked by its losses). The
graph compile is step 1's `per_step_time` minus the steady step. The 1-minute load average is
recorded before and after every run. The worker's CPU seconds (and the `sft run` process's, which
holds the live log reader) are sampled every 0.25 s and reported per steady step as well; under
load the worker's CPU time grows too (MindSpore's runtime threads spin while they wait).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from startup import process_start
from trl_compare import cpu_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2-135m" / "lora.yaml"
#: Overrides of both backends: no packing (MindFormers on CPU refuses it), fp32 (no native bf16
#: on an AVX2 CPU, and MindSpore's CPU kernels have none), no eval, plots or exports in the run.
COMMON = [
    "train.precision=fp32",
    "data.packing=false",
    "data.eval=null",
    "eval.every_steps=null",
    "eval.prompts=null",
    "logging.plot=false",
    "logging.every_steps=1",
]

# MindFormers' log: "2026-12-03 14:31:25,873 - mindformers... - INFO - { Epoch:[  1/  1],
# step:[    1/    6], loss:[5.801279/5.801279], per_step_time: 16290ms, lr: 0.001, ..."
_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
_STEP = re.compile(
    _STAMP + r".*?step:\[\s*(\d+)/\s*\d+\], loss: ?\[?([-+0-9.eEnaif]+)[/,].*?"
    r"per_step_time: (\d+)ms"
)
#: MindFormers' own milestones before the first step (base_trainer's log lines).
MARKERS = {
    "init_config": "Init Config",
    "init_train_model": "Starting Init Train Model",
    "compiling": "Model Compiling",
    "training": "Starting Training Model",
    "over": "Training Over",
}


def log_time(stamp: str) -> float:
    return time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:]) / 1000


def parse_worker_log(path: Path) -> dict[str, Any]:
    """Per-step (time, per_step_time, loss) and the milestone times of a MindFormers log."""
    text = path.read_text(errors="replace")
    steps: dict[int, dict[str, float]] = {}
    for m in _STEP.finditer(text):
        stamp, step, loss, ms = m.groups()
        steps[int(step)] = {"t": log_time(stamp), "step_s": int(ms) / 1000, "loss": float(loss)}
    marks: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(_STAMP, line)
        if not m:
            continue
        for key, needle in MARKERS.items():
            if key not in marks and needle in line:
                marks[key] = log_time(m.group(1))
    return {"steps": [{"step": k, **steps[k]} for k in sorted(steps)], "marks": marks}


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return [f for f in wanted if f in flags]


# ------------------------------------------------------------------------------ children


def sft_child(config: str, overrides: list[str]) -> dict[str, Any]:
    """`sft run --backend mindspore` in this process, each phase stamped (wall, epoch s)."""
    start = process_start()
    stamps: dict[str, list[float]] = {}
    import sft.run
    import sft_mindspore.data
    import sft_mindspore.mfconfig
    import sft_mindspore.train
    from sft.cli import main as sft_main

    def wrap(module: Any, name: str, label: str, before: Any = None) -> None:
        inner = getattr(module, name, None)
        if inner is None:
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before()
            t0 = time.time()
            try:
                return inner(*args, **kwargs)
            finally:
                stamps.setdefault(label, [t0, time.time()])

        setattr(module, name, timed)

    wrap(sft.run, "build_plan", "plan")
    wrap(sft_mindspore.train, "prepare", "prepare")
    wrap(sft_mindspore.data, "build_schedule", "schedule")

    def import_mindspore() -> None:
        # sft's process imports mindspore first to write the MindRecord: its own stamp, so
        # that "mindrecord" is the writing alone
        t0 = time.time()
        import mindspore.mindrecord  # noqa: F401

        stamps.setdefault("import_mindspore", [t0, time.time()])

    wrap(sft_mindspore.data, "write_training_data", "mindrecord", import_mindspore)
    wrap(sft_mindspore.train, "hf_to_ckpt", "conversion")
    wrap(sft_mindspore.mfconfig, "build_yaml", "yaml")
    wrap(sft_mindspore.train, "launch", "worker")
    wrap(sft_mindspore.train, "export_final", "export")
    imported = time.time()
    rc = sft_main(["run", "--backend", "mindspore", "--config", config, *overrides])
    return {
        "process_start": start,
        "imported": imported,
        "end": time.time(),
        "rc": rc,
        "stamps": stamps,
    }


def hand_child(yaml_path: str, output_dir: str) -> None:
    """MindFormers' run_mindformer.py core on the YAML, plus what the YAML needs on CPU."""
    import sft_mindspore.lr  # noqa: F401  registers SftWarmUpDecayLR, the YAML's lr_schedule
    from mindformers import MindFormerConfig, Trainer, build_context
    from sft_mindspore.cpu_compat import apply_runtime_patches

    config = MindFormerConfig(yaml_path)
    config.output_dir = output_dir  # run_mindformer.py --output_dir
    apply_runtime_patches(str(config.context.device_target))
    build_context(config)
    Trainer(config).train()


# ------------------------------------------------------------------------------ the runs


def run_sampled(cmd: list[str], log: Any, env: dict[str, str], sft: bool) -> tuple[int, list]:
    """Run `cmd`; every 0.25 s note (time, the MindFormers worker's CPU s, for `sft` also the
    `sft run` process's own CPU s). CPU time is what a shared machine's load changes least."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    me, worker, samples = psutil.Process(proc.pid), None, []
    while proc.poll() is None:
        try:
            if worker is None:
                found = [c for c in me.children() if "worker.py" in " ".join(c.cmdline())]
                worker = found[0] if found else (None if sft else me)
            if worker is not None:
                w, p = worker.cpu_times(), me.cpu_times()
                samples.append((time.time(), w.user + w.system, p.user + p.system))
        except psutil.Error:
            pass
        time.sleep(0.25)
    return proc.returncode, samples


def cpu_at(samples: list, t: float, col: int) -> float:
    """CPU seconds (column `col` of the samples) at time `t`, linearly interpolated."""
    before = [s for s in samples if s[0] <= t]
    after = [s for s in samples if s[0] >= t]
    if not before or not after:
        return float("nan")
    a, b = before[-1], after[0]
    return a[col] if b[0] == a[0] else a[col] + (b[col] - a[col]) * (t - a[0]) / (b[0] - a[0])


def run_sft(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    overrides = [
        *COMMON,
        f"train.max_steps={args.steps}",
        "checkpoint.every_steps=null",
        "export.formats=[]",
        "mindspore.device_target=CPU",
        f"mindspore.threads={args.threads}",
        f"output_dir={run_dir}",
        *args.overrides,
    ]
    out = run_dir.with_suffix(".stamps.json")
    cmd = [
        sys.executable,
        __file__,
        "--sft-child",
        str(out),
        "--config",
        str(args.config),
        "--",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # as the by-hand run's
    load0, t0 = os.getloadavg()[0], time.time()
    with open(run_dir.with_suffix(".out"), "w") as f:
        rc, samples = run_sampled(cmd, f, env, sft=True)
    t1, load1 = time.time(), os.getloadavg()[0]
    if rc:
        raise SystemExit(f"sft run failed (exit {rc}); see {run_dir.with_suffix('.out')}")
    child = json.loads(out.read_text())
    st = child["stamps"]
    log = parse_worker_log(run_dir / "mindformers" / "worker_0.log")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and "eval_loss" not in r]
    cum = [0.0] + [float(r["tokens"]) for r in rows]
    cum_tr = [0.0] + [float(r["trained_tokens"]) for r in rows]
    phases = {k: round(v[1] - v[0], 3) for k, v in st.items()}
    return {
        "kind": "sft",
        "run_dir": str(run_dir),
        "yaml": str(run_dir / "mindformers.yaml"),
        "load_before": load0,
        "load_after": load1,
        "wall_s": t1 - t0,
        "process_start": child["process_start"],
        "python_and_imports_s": round(child["imported"] - child["process_start"], 3),
        "phases_s": phases,
        "missing_phases": sorted(
            {"plan", "prepare", "schedule", "mindrecord", "conversion", "yaml", "worker"} - set(st)
        ),
        "worker_start": st["worker"][0],
        "worker_end": st["worker"][1],
        "cpu_samples": samples,
        "tokens": [b - a for a, b in itertools.pairwise(cum)],
        "trained_tokens": [b - a for a, b in itertools.pairwise(cum_tr)],
        **log,
    }


def run_hand(args: argparse.Namespace, yaml_path: Path, out_dir: Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "LOCAL_DEFAULT_PATH": str(out_dir),  # MindFormers' log/ goes here, not into the cwd
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [sys.executable, __file__, "--hand-child", str(yaml_path), str(out_dir / "output")]
    log_path = out_dir / "worker.log"
    load0, t0 = os.getloadavg()[0], time.time()
    with open(log_path, "w") as f:
        rc, samples = run_sampled(cmd, f, env, sft=False)
    t1, load1 = time.time(), os.getloadavg()[0]
    if rc:
        raise SystemExit(f"MindFormers by hand failed (exit {rc}); see {log_path}")
    return {
        "kind": "hand",
        "yaml": str(yaml_path),
        "output_dir": str(out_dir),
        "load_before": load0,
        "load_after": load1,
        "wall_s": t1 - t0,
        "worker_start": t0,
        "worker_end": t1,
        "cpu_samples": samples,
        **parse_worker_log(log_path),
    }


def run_torch(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out = work / "torch-bench.json"
    overrides = [*COMMON, "torch.device=cpu", f"torch.num_threads={args.threads}", *args.overrides]
    cmd = [
        args.torch_python,
        "-m",
        "sft",
        "bench",
        "--config",
        str(args.config),
        "--steps",
        str(args.steps),
        "--json",
        str(out),
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    load0, t0 = os.getloadavg()[0], time.time()
    with open(work / "torch-bench.out", "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    t1, load1 = time.time(), os.getloadavg()[0]
    if rc:
        raise SystemExit(f"sft bench (torch) failed (exit {rc}); see {work / 'torch-bench.out'}")
    r = json.loads(out.read_text())
    return {
        "kind": "torch",
        "load_before": load0,
        "load_after": load1,
        "wall_s": t1 - t0,
        "bench": r,
    }


# ------------------------------------------------------------------------------ the numbers


def steady_ms(run: dict[str, Any], tokens: list[float], warmup: int) -> dict[str, Any]:
    """A MindSpore run's steady state: steps after `warmup`, wall time between log lines."""
    steps = run["steps"]
    if len(steps) <= warmup + 1:
        raise SystemExit(f"{run['kind']}: {len(steps)} step lines; need more than --warmup + 1")
    t = [s["t"] for s in steps]
    wall = [b - a for a, b in itertools.pairwise(t[warmup - 1 :])]  # steps warmup+1 .. n
    mf = [s["step_s"] for s in steps[warmup:]]
    toks = tokens[warmup : len(steps)]
    first = steps[0]
    marks = run["marks"]
    step_s = statistics.median(mf)
    return {
        "measured_steps": len(wall),
        "step_s": sum(wall) / len(wall),
        "mf_step_s": sum(mf) / len(mf),
        "tokens_per_s": sum(toks) / sum(wall),
        "steps_per_s": len(wall) / sum(wall),
        "first_step_mf_s": first["step_s"],
        "compile_s": first["step_s"] - step_s,
        "worker_to_first_step_s": first["t"] - run["worker_start"],
        "worker_to_training_s": marks.get("training", float("nan")) - run["worker_start"],
        "ckpt_load_and_build_s": marks.get("training", float("nan"))
        - marks.get("init_train_model", float("nan")),
        **steady_cpu(run, t[warmup - 1], t[-1], len(wall)),
    }


def steady_cpu(run: dict[str, Any], t0: float, t1: float, steps: int) -> dict[str, Any]:
    """The worker's CPU seconds per steady step and, for sft, the `sft run` process's CPU over
    the same window as a share of the worker's (its live reader)."""
    samples = run.get("cpu_samples")
    if not samples:
        return {}
    worker = cpu_at(samples, t1, 1) - cpu_at(samples, t0, 1)
    out = {"worker_cpu_per_step_s": worker / steps}
    if run["kind"] == "sft":
        out["sft_process_cpu_share"] = (cpu_at(samples, t1, 2) - cpu_at(samples, t0, 2)) / worker
    return out


def steady_torch(bench: dict[str, Any], warmup: int) -> dict[str, Any]:
    secs = bench["step_seconds"][warmup - 1 :]  # step_seconds[i] = duration of step i + 2
    toks = bench["tokens"][warmup:]
    return {
        "measured_steps": len(secs),
        "step_s": sum(secs) / len(secs),
        "tokens_per_s": sum(toks) / sum(secs),
        "steps_per_s": len(secs) / sum(secs),
        "bench_processed_tokens_per_s": bench["processed_tokens_per_s"],
        "time_to_first_step_s": bench["time_to_first_step_s"],
        "first_step_s": bench["first_step_s"],
        "threads": bench["threads"],
        "precision": bench["precision"],
    }


def summarize(runs: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    med = statistics.median
    sft = [r for r in runs if r["kind"] == "sft"]
    hand = [r for r in runs if r["kind"] == "hand"]
    torch_runs = [r for r in runs if r["kind"] == "torch"]
    for r in sft + hand:
        r["steady"] = steady_ms(r, r.get("tokens") or r["tokens_from"], warmup)
    for r in torch_runs:
        r["steady"] = steady_torch(r["bench"], warmup)

    def side(rs: list[dict[str, Any]]) -> dict[str, float]:
        keys = ("step_s", "tokens_per_s", "steps_per_s")
        return {k: med(r["steady"][k] for r in rs) for k in keys} if rs else {}

    s, h = side(sft), side(hand)
    pairs = [
        round(100 * (a["steady"]["step_s"] / b["steady"]["step_s"] - 1), 2)
        for a, b in zip(sft, hand, strict=True)
    ]
    pairs_mf = [
        round(100 * (a["steady"]["mf_step_s"] / b["steady"]["mf_step_s"] - 1), 2)
        for a, b in zip(sft, hand, strict=True)
    ]
    cpu = [
        (a["steady"].get("worker_cpu_per_step_s"), b["steady"].get("worker_cpu_per_step_s"))
        for a, b in zip(sft, hand, strict=True)
    ]
    pairs_cpu = [round(100 * (a / b - 1), 2) for a, b in cpu if a and b]
    phases = (
        "plan",
        "schedule",
        "import_mindspore",
        "mindrecord",
        "conversion",
        "yaml",
        "prepare",
        "export",
    )
    one_time = {
        f"{p}_s": med(r["phases_s"][p] for r in sft)
        for p in phases
        if all(p in r["phases_s"] for r in sft)
    }
    one_time["sft_before_worker_s"] = med(r["worker_start"] - r["process_start"] for r in sft)
    ms = sft + hand
    one_time["compile_s"] = med(r["steady"]["compile_s"] for r in ms)
    one_time["worker_to_first_step_s"] = med(r["steady"]["worker_to_first_step_s"] for r in ms)
    loss_gap = max(
        (
            abs(a["loss"] - b["loss"])
            for x, y in zip(sft, hand, strict=True)
            for a, b in zip(x["steps"], y["steps"], strict=True)
        ),
        default=None,
    )
    runs_gap = max(
        (
            abs(a["loss"] - b["loss"])
            for x in sft[1:]
            for a, b in zip(sft[0]["steps"], x["steps"], strict=True)
        ),
        default=None,
    )
    out: dict[str, Any] = {
        "sft_mindspore": s,
        "hand_mindspore": h,
        "overhead_pct": round(100 * (s["step_s"] / h["step_s"] - 1), 2) if s and h else None,
        "overhead_pct_pairs": pairs,
        "overhead_pct_pairs_mf_step_time": pairs_mf,
        # worker CPU s per steady step, sft's over by hand's (the load changes it far less)
        "overhead_pct_pairs_worker_cpu": pairs_cpu,
        "sft_process_cpu_share": [
            r["steady"]["sft_process_cpu_share"]
            for r in sft
            if "sft_process_cpu_share" in r["steady"]
        ],
        "max_loss_diff_sft_vs_hand": loss_gap,
        # the same YAML twice through sft: MindSpore's own run-to-run spread of the losses
        "max_loss_diff_sft_runs": runs_gap,
        "one_time_s": one_time,
    }
    if torch_runs:
        t = side(torch_runs)
        out["torch"] = {**t, "runs": len(torch_runs)}
        out["torch"]["same_tokens_per_step_as_mindspore"] = bool(sft) and all(
            r["bench"]["tokens"] == [int(x) for x in sft[0]["tokens"]] for r in torch_runs
        )
        if s:
            out["mindspore_vs_torch_tokens_per_s"] = round(s["tokens_per_s"] / t["tokens_per_s"], 3)
    return out


def table(runs: list[dict[str, Any]], s: dict[str, Any]) -> str:
    lines = [
        f"{'run':<22} {'steady step s':>13} {'MF step s':>9} {'tokens/s':>9} "
        f"{'compile s':>9} {'load':>10}",
        "-" * 78,
    ]
    for r in runs:
        st = r["steady"]
        name = {
            "sft": "sft run (MindSpore)",
            "hand": "same YAML by hand",
            "torch": "torch (sft bench)",
        }[r["kind"]]
        mf = f"{st['mf_step_s']:.3f}" if "mf_step_s" in st else "-"
        comp = f"{st['compile_s']:.1f}" if "compile_s" in st else "-"
        lines.append(
            f"{name:<22} {st['step_s']:>13.3f} {mf:>9} {st['tokens_per_s']:>9.1f} {comp:>9} "
            f"{r['load_before']:>4.1f}->{r['load_after']:<4.1f}"
        )
    ot = s["one_time_s"]
    lines += [
        "",
        f"sft vs by hand (steady step time): {s['overhead_pct']:+.2f}% (pairs: "
        + ", ".join(f"{p:+.2f}%" for p in s["overhead_pct_pairs"])
        + "; MindFormers' per_step_time: "
        + ", ".join(f"{p:+.2f}%" for p in s["overhead_pct_pairs_mf_step_time"])
        + ")",
        "worker CPU s per steady step, sft vs by hand: "
        + (", ".join(f"{p:+.2f}%" for p in s.get("overhead_pct_pairs_worker_cpu", [])) or "-")
        + "; the sft run process's CPU / the worker's: "
        + (", ".join(f"{x:.2%}" for x in s.get("sft_process_cpu_share", [])) or "-"),
        f"max |loss sft - loss by hand| per step: {s['max_loss_diff_sft_vs_hand']} (sft run 1 "
        f"vs sft run 2: {s['max_loss_diff_sft_runs']})",
        "one-time (sft, median): "
        + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in ot.items() if k != "sft_before_worker_s"),
    ]
    if "torch" in s:
        lines.append(
            f"torch on the same config: {s['torch']['tokens_per_s']:.1f} tokens/s; MindSpore / "
            f"torch = {s.get('mindspore_vs_torch_tokens_per_s')}"
        )
    return "\n".join(lines)


def versions(python: str, modules: list[str]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    proc = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=CONFIG, help="job spec (default: SmolLM2 LoRA)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of steady state")
    p.add_argument("--repeats", type=int, default=2, help="sft / by-hand pairs, interleaved")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of every run")
    p.add_argument(
        "--torch-python",
        default=str(ROOT / ".venvs" / "torch" / "bin" / "python"),
        help="python of the torch environment ('' skips the torch run)",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="run directories go into a new subdirectory (default: a temp dir)",
    )
    p.add_argument("--json", type=Path, default=None, help="write every run's numbers here")
    p.add_argument(
        "--from-json", type=Path, help="summarize the runs of an earlier --json again (no runs)"
    )
    p.add_argument("--sft-child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--hand-child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config (both backends)")
    args = p.parse_args(argv)
    if args.sft_child:
        res = sft_child(str(args.config), args.overrides)
        args.sft_child.write_text(json.dumps(res))
        return int(res["rc"] or 0)
    if args.hand_child:
        hand_child(*args.hand_child)
        return 0
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        result["summary"] = summarize(result["runs"], result["warmup"])
        print(table(result["runs"], result["summary"]))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        return 0
    if args.warmup < 1 or args.steps < args.warmup + 2:
        p.error("need --warmup >= 1 and --steps >= --warmup + 2")
    if args.work_dir:  # a fresh directory per invocation: no run dir of an earlier one
        work = args.work_dir / time.strftime("%Y%m%d-%H%M%S")
        work.mkdir(parents=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="ms-bench-"))
    runs: list[dict[str, Any]] = []
    for i in range(args.repeats):
        run_dir = work / f"sft-{i}"
        runs.append(run_sft(args, run_dir))
        print(f"sft run {i}: {runs[-1]['wall_s']:.0f} s", flush=True)
        hand = run_hand(args, run_dir / "mindformers.yaml", work / f"hand-{i}")
        hand["tokens_from"] = runs[-1]["tokens"]  # the same MindRecord, step by step
        runs.append(hand)
        print(f"by hand {i}: {hand['wall_s']:.0f} s", flush=True)
    if args.torch_python:
        runs.append(run_torch(args, work))
        print(f"torch: {runs[-1]['wall_s']:.0f} s", flush=True)
    summary = summarize(runs, args.warmup)
    print(table(runs, summary))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu_model() or platform.processor(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "config": str(args.config),
        "overrides": [*COMMON, *args.overrides],
        "steps": args.steps,
        "warmup": args.warmup,
        "versions": {
            **versions(sys.executable, ["mindspore", "mindformers", "sft"]),
            **(
                versions(args.torch_python, ["torch", "transformers", "peft"])
                if args.torch_python
                else {}
            ),
        },
        "summary": summary,
        "runs": runs,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
