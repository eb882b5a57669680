"""What the end-to-end resume tests share: a work directory with the tests' tiny model and a
small random chat dataset, and `sft run` as a subprocess in a session of its own (so a SIGKILL of
its process group reaches every worker)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

WORDS = "the quick brown fox jumps over lazy dog hello help capital france paris".split()


def make_workdir(d: Path, model: Path, chats: int) -> Path:
    """d/train.jsonl (`chats` short user/assistant pairs, seeded) and d/model -> `model`."""
    rng = random.Random(0)
    with open(d / "train.jsonl", "w") as f:
        for _ in range(chats):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    os.symlink(model, d / "model")
    return d


def sft_run(cfg: Path, *args: str) -> subprocess.Popen:
    """`sft run --config cfg ARGS` with one OpenMP thread, output captured as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "sft", "run", "--config", str(cfg), *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: SIGKILL reaches the workers too
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    """The run's output; it must have exited 0 without a traceback."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out}"
    assert "Traceback" not in out, out
    return out
