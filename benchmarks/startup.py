"""Where the time to the first optimizer step goes, from the start of the process (issue #19).

    $ .venvs/torch/bin/python benchmarks/startup.py --config configs/smollm2-135m/lora.yaml --runs 3
    $ .venvs/torch/bin/python benchmarks/startup.py --config FILE --runs 3 --json out.json torch.num_threads=1

Each run is a fresh process (nothing imported or cached in memory; the data cache and the
converted model on disk are warmed by one untimed run first) that trains exactly one step
through the torch backend's own loop (`sft_torch.train.train`, with `sft bench`'s overrides: no
eval, checkpoints, exports or plots) and stamps each phase in wall time since the process
started and in CPU time (user + system of the whole process):

    python      interpreter start-up, until this script runs
    imports     torch, transformers (its lazy module index and the model class), peft, sft
    plan        config validation and data preparation (a cache hit when warm)
    load        AutoModelForCausalLM.from_pretrained (safetensors) and .to(device)
    method      the fine-tuning method (peft LoRA wrapping, the A matrices' seeded draw)
    trainer     the rest of the trainer: speed levers, optimizer, scheduler, state
    first_step  the first optimizer step (forward, backward, optimizer) until it is logged

The phase boundaries come from wrappers around `load_model` and `apply_method` as the loop's
module calls them; a phase the loop no longer calls by that name is reported as part of
`trainer`. The load average (1 min) is recorded before and after every run: on a shared
machine wall times follow it, CPU times much less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PHASES = ("python", "imports", "plan", "load", "method", "trainer", "first_step")


def boot_clock() -> float:
    """Seconds since boot (CLOCK_BOOTTIME, the clock /proc/self/stat's start time counts on)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def process_start() -> float:
    """When this process started, in `boot_clock` seconds (Linux /proc, 10 ms ticks), else now.

    Not the epoch time from /proc/stat's `btime`: that is whole seconds, so "python" came out
    as about 1 s of wall time with 0.07 s of CPU (the rounding of btime, not interpreter
    start-up)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        since_boot = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return since_boot / ticks
    except (OSError, ValueError, IndexError):
        return boot_clock()


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class Stamps:
    def __init__(self) -> None:
        self.start = process_start()
        self.marks: list[tuple[str, float, float]] = []

    def mark(self, name: str) -> None:
        self.marks.append((name, boot_clock() - self.start, cpu_s()))

    def phases(self) -> dict[str, dict[str, float]]:
        """Per phase: wall and CPU seconds it took (a phase not stamped merges into the next)."""
        out, wall0, cpu0 = {}, 0.0, 0.0
        for name, wall, cpu in self.marks:
            out[name] = {"wall_s": wall - wall0, "cpu_s": cpu - cpu0}
            wall0, cpu0 = wall, cpu
        return out


def child(config: Path, overrides: list[str]) -> dict[str, Any]:
    """One timed run in this (fresh) process."""
    stamps = Stamps()
    stamps.mark("python")
    from sft.config import load_config
    from sft.events import RunEvents
    from sft.plugins import get_plugins
    from sft.run import build_plan
    from sft_torch.imports import import_train

    import_train("lora")  # as the torch backend imports them for `sft run` of a LoRA config
    import torch
    from sft_torch import train as train_mod
    from sft_torch.bench import forced_overrides

    stamps.mark("imports")

    def wrap(name: str, phase: str) -> None:
        inner = getattr(train_mod, name, None)
        if inner is None:
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            stamps.mark(phase)
            return out

        setattr(train_mod, name, timed)

    wrap("load_model", "load")
    wrap("apply_method", "method")

    class Events(RunEvents):
        def train_start(self, info: dict[str, Any]) -> None:
            stamps.mark("trainer")
            super().train_start(info)

        def log(self, step: int, metrics: dict[str, float]) -> None:
            if "loss" in metrics and "eval_loss" not in metrics and step == 1:
                stamps.mark("first_step")
            super().log(step, metrics)

    with tempfile.TemporaryDirectory(prefix="sft-startup-") as tmp:
        cfg = load_config(config, [*overrides, *forced_overrides(1, Path(tmp))], backend="torch")
        plugins = get_plugins()
        plan, backend = build_plan(cfg, plugins)
        stamps.mark("plan")
        events = Events(cfg, plan.run_dir, plugins.hook)
        backend.train(plan, events)
    phases = stamps.phases()
    first = next(m for m in stamps.marks if m[0] == "first_step")
    return {
        "phases": phases,
        "time_to_first_step_s": first[1],
        "cpu_to_first_step_s": first[2],
        "threads": torch.get_num_threads(),
    }


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, __file__, "--child", str(out), "--config", str(args.config)]
    load_before = os.getloadavg()[0]
    proc = subprocess.run([*cmd, *args.overrides], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"startup run failed (exit {proc.returncode}); output above")
    result = json.loads(out.read_text())
    out.unlink()
    result.update(load_before=load_before, load_after=os.getloadavg()[0])
    return result


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over the runs of each phase's wall and CPU seconds, and of the totals."""
    med = statistics.median
    return {
        "phases": {
            p: {k: med(r["phases"][p][k] for r in runs) for k in ("wall_s", "cpu_s")}
            for p in PHASES
            if all(p in r["phases"] for r in runs)
        },
        "time_to_first_step_s": med(r["time_to_first_step_s"] for r in runs),
        "cpu_to_first_step_s": med(r["cpu_to_first_step_s"] for r in runs),
    }


def table(s: dict[str, Any]) -> str:
    lines = [f"{'phase':<12} {'wall s':>8} {'cpu s':>8}", "-" * 30]
    for p, v in s["phases"].items():
        lines.append(f"{p:<12} {v['wall_s']:>8.2f} {v['cpu_s']:>8.2f}")
    lines.append(
        f"{'total':<12} {s['time_to_first_step_s']:>8.2f} {s['cpu_to_first_step_s']:>8.2f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, required=True, help="the job spec to start")
    p.add_argument("--runs", type=int, default=3, help="timed fresh processes (median reported)")
    p.add_argument("--json", type=Path, default=None, help="write every run's numbers here")
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the untimed first run (the data cache and converted model are already there)",
    )
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: one timed run
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if not args.config.is_file():
        p.error(f"--config: {args.config} is not a file")
    if args.child:
        args.child.write_text(json.dumps(child(args.config, args.overrides)))
        return 0
    if not args.no_warmup:
        run_once(args)  # untimed: warms the data cache and the converted model on disk
    runs = [run_once(args) for _ in range(args.runs)]
    s = summary(runs)
    print(table(s))
    loads = ", ".join(f"{r['load_before']:.1f}->{r['load_after']:.1f}" for r in runs)
    print(f"{runs[0]['threads']} threads; load average (1 min) before->after each run: {loads}")
    if args.json:
        args.json.write_text(
            json.dumps({"config": str(args.config), "summary": s, "runs": runs}, indent=2)
        )
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
