"""Launch MindFormers workers: one subprocess for one device, msrun for several (or many nodes).

Workers run `sft_mindspore/entry.py` with this environment's python (msrun starts `python` from
PATH, so the environment's bin/ goes first on PATH). A failed worker becomes an SftError naming
the rank and the log to read.

    log_dir = launch(yaml_path, parallel=config.parallel, work_dir=run_dir / "mindformers")
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from sft.errors import SftError

ENTRY = Path(__file__).with_name("entry.py")


def worker_env(work_dir: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["LOCAL_DEFAULT_PATH"] = str(work_dir)  # MindFormers' logs go here, not into the cwd
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("GLOG_v", "2")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def msrun_command(yaml_path: Path, parallel: Any, log_dir: Path) -> list[str]:
    """msrun for `parallel.nproc_per_node` workers on this node out of `world_size` in all."""
    return [
        str(Path(sys.executable).with_name("msrun")),
        "--worker_num",
        str(parallel.world_size),
        "--local_worker_num",
        str(parallel.nproc_per_node),
        "--master_addr",
        parallel.master_addr,
        "--master_port",
        str(parallel.master_port),
        "--node_rank",
        str(parallel.node_rank),
        "--log_dir",
        str(log_dir),
        "--join",
        "True",
        "--cluster_time_out",
        "600",
        str(ENTRY),
        "--config",
        str(yaml_path),
    ]


def launch(
    yaml_path: Path, parallel: Any, work_dir: Path, threads: int = 1, progress: bool = True
) -> Path:
    """Run training to the end; returns the directory holding the worker logs. `progress`
    (`logging.progress`): echo MindFormers' per-step loss lines of a single worker."""
    work_dir.mkdir(parents=True, exist_ok=True)
    env = worker_env(work_dir, threads)
    if parallel.world_size == 1:
        log = work_dir / "worker_0.log"
        cmd = [sys.executable, str(ENTRY), "--config", str(yaml_path)]
        rc = _run_showing_progress(cmd, env, log, progress)
        if rc:
            raise SftError(_failure(0, log, rc))
        return work_dir
    log_dir = work_dir / "msrun"
    cmd = msrun_command(yaml_path, parallel, log_dir)
    with (work_dir / "msrun.log").open("w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        rank, log = _failed_rank(log_dir, parallel)
        raise SftError(_failure(rank, log, rc))
    return log_dir


def _run_showing_progress(cmd: list[str], env: dict[str, str], log: Path, show: bool = True) -> int:
    """Run one worker, everything into `log`; its per-step loss lines also go to stdout so a
    long run shows progress (MindFormers' other output stays in the log)."""
    with (
        log.open("w") as f,
        subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            m = _PROGRESS.search(line) if show else None
            if m:
                step, total, loss = m.groups()
                print(f"[mindformers] step {step}/{total} loss {loss}", flush=True)
        return proc.wait()


_PROGRESS = re.compile(r"step:\[\s*(\d+)/\s*(\d+)\], loss: ?\[?([-+0-9.eEnaif]+)")


def _failed_rank(log_dir: Path, parallel: Any) -> tuple[int, Path]:
    first = parallel.node_rank * parallel.nproc_per_node
    for rank in range(first, first + parallel.nproc_per_node):
        log = log_dir / f"worker_{rank}.log"
        if not log.exists() or re.search(r"Traceback|Error", log.read_text(errors="replace")):
            return rank, log
    return first, log_dir / "scheduler.log"


def _failure(rank: int, log: Path, rc: int) -> str:
    tail = ""
    if log.exists():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.search(r"Error|error:|Traceback", ln)]
        tail = "\n  ".join((errors or lines)[-6:])
    return f"MindFormers worker rank {rank} failed (exit code {rc}); its log: {log}\n  {tail}"


def loss_of(yaml_path: Path, ckpt: Path, batch: dict[str, Any], work_dir: Path) -> float:
    """MindFormers' training loss of `ckpt`'s weights on one batch (input_ids, labels arrays of
    [B, seq_length + 1]), computed by the YAML's own network in a fresh worker."""
    import json

    import numpy as np

    work_dir.mkdir(parents=True, exist_ok=True)
    npz, out, log = work_dir / "loss_batch.npz", work_dir / "loss.json", work_dir / "loss.log"
    np.savez(
        npz,
        input_ids=np.asarray(batch["input_ids"], np.int32),
        labels=np.asarray(batch["labels"], np.int32),
    )
    cmd = [
        sys.executable,
        str(ENTRY),
        "--config",
        str(yaml_path),
        "--loss-of",
        str(ckpt),
        "--batch",
        str(npz),
        "--out",
        str(out),
    ]
    with log.open("w") as f:
        rc = subprocess.run(
            cmd, env=worker_env(work_dir, 1), stdout=f, stderr=subprocess.STDOUT
        ).returncode
    if rc:
        raise SftError(_failure(0, log, rc))
    return float(json.loads(out.read_text())["loss"])
