"""What sft's live reader costs a MindSpore run (issue #21: it must not slow training by more than
2%), measured as CPU time rather than wall time, which a shared machine makes too noisy to show
a 2% effect: while the MindFormers worker trains, `sft run` (the parent) only reads the worker's
output, updates the progress bar and appends metrics rows. The ratio of the parent's CPU seconds
over that window to the worker's CPU seconds bounds the slowdown on a machine with a core to
spare, and is the share of the worker's compute it takes when cores are scarce.

    $ .venvs/ms/bin/python benchmarks/ms_reader_overhead.py --steps 60 [--out results.json]

Trains the tests' tiny llama (LoRA, fp32, CPU, 1 thread), logging every step (the most rows).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trl_compare import cpu_model

from tests.tiny import make_model

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "hello",
    "help",
    "capital",
    "france",
    "paris",
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ms-reader-"))
    model = make_model(work / "model", arch="llama")
    rng = random.Random(0)
    with open(work / "train.jsonl", "w") as f:
        for _ in range(256):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    spec = {
        "backend": "mindspore",
        "model": str(model),
        "data": {"train": str(work / "train.jsonl"), "max_seq_len": 128, "packing": False},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": args.steps, "micro_batch_size": 2, "learning_rate": 1e-3},
        "checkpoint": {"every_steps": 1000},
        "logging": {"every_steps": 1, "plot": False, "progress": True},
        "mindspore": {"device_target": "CPU", "threads": 1},
        "output_dir": str(work / "run"),
    }
    (work / "job.yaml").write_text(yaml.safe_dump(spec))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sft", "run", "--config", str(work / "job.yaml")],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parent = psutil.Process(proc.pid)
    worker = None
    start_parent = None
    last_worker = None
    while proc.poll() is None:
        try:
            if worker is None:
                for p in parent.children(recursive=True):
                    if any(a.endswith("sft_mindspore/worker.py") for a in p.cmdline()):
                        worker = p
                        c = parent.cpu_times()
                        start_parent = c.user + c.system
                        t0 = time.time()
            elif worker.is_running():
                c = worker.cpu_times()
                last_worker = c.user + c.system
                c = parent.cpu_times()
                end_parent = c.user + c.system
                t1 = time.time()
        except psutil.Error:
            pass
        time.sleep(0.05)
    assert proc.returncode == 0, proc.returncode
    assert worker is not None and last_worker and start_parent is not None
    lines = (work / "run" / "metrics.jsonl").read_text().splitlines()
    rows = sum(1 for line in lines if '"loss"' in line)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_model(),
        "load_avg_1m_end": os.getloadavg()[0],
        "steps": args.steps,
        "metrics_rows": rows,
        "window_s": round(t1 - t0, 2),
        "worker_cpu_s": round(last_worker, 3),
        "reader_cpu_s": round(end_parent - start_parent, 3),
        "reader_share": round((end_parent - start_parent) / last_worker, 5),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
