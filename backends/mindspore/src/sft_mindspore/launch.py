"""Launch MindFormers workers: one subprocess for one device, msrun's dynamic cluster for several
(on one node or many), or one process per device from an Ascend HCCL rank table.

Workers run `sft_mindspore/worker.py` with this environment's python (msrun starts `python` from
PATH, so the environment's bin/ goes first on PATH). A failed worker becomes an SftError naming
the rank and the log to read. `launch_plan` lists the processes of every node, so `sft run
--dry-run` can print the command each node runs.

    log_dir = launch(yaml_path, parallel=config.parallel, work_dir=run_dir / "mindformers")

Logs are per node (`msrun/node_R/`, `ranktable/node_R/`) when there are several nodes, so
nodes sharing one run directory never write the same file.

SIGTERM / SIGINT to `sft run`: one worker gets the signal forwarded (`ForwardSignals`); several
workers get a stop request file and agree on one stop step (`RequestStop`,
`sft_mindspore.stopfile`); either way `launch` raises `Stopped` once they checkpointed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.errors import ConfigError, Problem, SftError
from sft.guard import StopSignals

from sft_mindspore.stopfile import ENV as STOP_ENV
from sft_mindspore.stopfile import StopFiles

WORKER = Path(__file__).with_name("worker.py")


@dataclass
class Process:
    """One process a node starts: its command line, the variables sft sets, its log."""

    node_rank: int
    argv: list[str]
    env: dict[str, str]
    log: Path

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        cmd = " ".join(shlex.quote(a) for a in self.argv)
        return (f"env {env} " if env else "") + cmd + f" > {shlex.quote(str(self.log))} 2>&1"


def worker_env(work_dir: Path, threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["LOCAL_DEFAULT_PATH"] = str(work_dir)  # MindFormers' logs go here, not into the cwd
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("GLOG_v", "2")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def log_dir_of(
    work_dir: Path, parallel: Any, node_rank: int | None = None, table: str | None = None
) -> Path:
    """Where a node's worker logs go: per node when there are several nodes."""
    node = parallel.node_rank if node_rank is None else node_rank
    kind = "ranktable" if table else "msrun"
    if parallel.world_size == 1:
        return work_dir
    return work_dir / kind / f"node_{node}" if parallel.nnodes > 1 else work_dir / kind


def worker_logs(work_dir: Path, parallel: Any, table: str | None = None) -> list[Path]:
    """The log of each worker of this node, in local-rank order."""
    if parallel.world_size == 1:
        return [work_dir / "worker_0.log"]
    log_dir = log_dir_of(work_dir, parallel, table=table)
    first = parallel.node_rank * parallel.nproc_per_node
    return [log_dir / f"worker_{first + r}.log" for r in range(parallel.nproc_per_node)]


def msrun_command(
    yaml_path: Path, parallel: Any, log_dir: Path, node_rank: int | None = None
) -> list[str]:
    """msrun for `parallel.nproc_per_node` workers on one node out of `world_size` in all."""
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
        str(parallel.node_rank if node_rank is None else node_rank),
        "--log_dir",
        str(log_dir),
        "--join",
        "True",
        "--cluster_time_out",
        "600",
        str(WORKER),
        "--config",
        str(yaml_path),
    ]


# ------------------------------------------------------------------------------ rank table


def rank_table_path(parallel: Any, device: str) -> str | None:
    """The rank table an Ascend run with several devices launches from: `parallel.
    rank_table_file`, else the RANK_TABLE_FILE environment variable; None for msrun."""
    if device == "CPU" or parallel.world_size == 1:
        return None
    return parallel.rank_table_file or os.environ.get("RANK_TABLE_FILE") or None


def read_rank_table(path: str, parallel: Any) -> list[list[dict[str, int]]]:
    """The devices of every node, `[[{"rank_id", "device_id"}, ...] per server]`, checked
    against `parallel` (nnodes servers, nproc_per_node devices each, ranks 0..world-1)."""
    where = "parallel.rank_table_file"
    try:
        table = json.loads(Path(path).read_text())
        servers = [
            [
                {"rank_id": int(d["rank_id"]), "device_id": int(d["device_id"])}
                for d in server["device"]
            ]
            for server in table["server_list"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            [
                Problem(
                    where,
                    f"cannot read the HCCL rank table {path}: {type(exc).__name__}: {exc}",
                    "give a rank table JSON with server_list[].device[].{device_id, rank_id}",
                )
            ]
        ) from exc
    problems = []
    if len(servers) != parallel.nnodes:
        problems.append(
            f"{path} lists {len(servers)} servers but parallel.nnodes is {parallel.nnodes}"
        )
    sizes = sorted({len(s) for s in servers})
    if sizes != [parallel.nproc_per_node]:
        problems.append(
            f"{path} lists {sizes} devices per server but parallel.nproc_per_node is "
            f"{parallel.nproc_per_node}"
        )
    ranks = sorted(d["rank_id"] for s in servers for d in s)
    if ranks != list(range(len(ranks))):
        problems.append(f"{path}: rank_id values must be 0..{len(ranks) - 1}, each once")
    if problems:
        raise ConfigError([Problem(where, p) for p in problems])
    return servers


def launch_plan(
    yaml_path: Path, parallel: Any, work_dir: Path, env: dict[str, str], table: str | None = None
) -> list[Process]:
    """Every process of the run on every node, in node order. `env`: variables sft exports to
    every worker (HCCL settings); `table`: the rank table (`rank_table_path`), None for msrun."""
    if parallel.world_size == 1:
        argv = [sys.executable, str(WORKER), "--config", str(yaml_path)]
        return [Process(0, argv, dict(env), work_dir / "worker_0.log")]
    env = {**env, STOP_ENV: str(stop_dir(work_dir))}  # where the workers agree on a stop step
    if table is None:
        out = []
        for node in range(parallel.nnodes):
            log_dir = log_dir_of(work_dir, parallel, node)
            argv = msrun_command(yaml_path, parallel, log_dir, node)
            out.append(Process(node, argv, dict(env), log_dir.with_suffix(".log")))
        return out
    out = []
    servers = read_rank_table(table, parallel)
    for node, devices in enumerate(servers):
        log_dir = log_dir_of(work_dir, parallel, node, table)
        for d in devices:
            rank_env = {
                **env,
                "RANK_TABLE_FILE": str(Path(table).resolve()),
                "RANK_ID": str(d["rank_id"]),
                "DEVICE_ID": str(d["device_id"]),
                "RANK_SIZE": str(parallel.world_size),
            }
            argv = [sys.executable, str(WORKER), "--config", str(yaml_path)]
            out.append(Process(node, argv, rank_env, log_dir / f"worker_{d['rank_id']}.log"))
    return out


def launch(
    yaml_path: Path,
    parallel: Any,
    work_dir: Path,
    threads: int = 1,
    env: dict[str, str] | None = None,
    table: str | None = None,
    progress: bool = True,
    on_output: Any = None,
) -> Path:
    """Run this node's processes to the end; returns the directory holding its worker logs.
    `progress` (`logging.progress`): echo MindFormers' per-step loss lines of a single worker.
    `on_output(local_rank, text)`: called with each piece of a worker's output as it is
    written (the pipe of one worker, the log files of several, read from where the last read
    stopped: nothing is missed or read twice), from a reader thread; used for live metrics."""
    work_dir.mkdir(parents=True, exist_ok=True)
    mine = [
        p
        for p in launch_plan(yaml_path, parallel, work_dir, env or {}, table)
        if p.node_rank == parallel.node_rank
    ]
    log_dir = log_dir_of(work_dir, parallel, table=table)
    log_dir.mkdir(parents=True, exist_ok=True)
    if parallel.world_size == 1:
        proc = mine[0]
        rc = _run_showing_progress(
            proc.argv, worker_env(work_dir, threads, proc.env), proc.log, progress, on_output
        )
        if rc:
            raise SftError(_failure(0, proc.log, rc))
        return work_dir
    logs = worker_logs(work_dir, parallel, table)
    for log in logs:  # msrun appends: a resumed run must not read the killed run's lines
        log.unlink(missing_ok=True)
    stop = StopFiles(stop_dir(work_dir))
    if parallel.node_rank == 0:
        stop.clear()  # a request / agreed step of an earlier, stopped launch
    with LogTailer(logs, on_output), RequestStop(stop) as req:
        if table is None:
            proc = mine[0]
            with proc.log.open("w") as f:
                rc = _run_msrun(proc.argv, worker_env(work_dir, threads, proc.env), f)
            if rc:
                rank, log = _failed_rank(log_dir, parallel)
                raise SftError(_failure(rank, log, rc))
        else:
            _run_rank_table(mine, work_dir, threads)
    agreed = stop.agreed()
    if agreed is not None or req.requested:
        raise Stopped(agreed[0] if agreed else str(req.requested))
    return log_dir


def stop_dir(work_dir: Path) -> Path:
    """Where several workers agree on their stop step (`sft_mindspore.stopfile`)."""
    return work_dir / "stop"


def _run_msrun(argv: list[str], env: dict[str, str], log: Any) -> int:
    """msrun in a session of its own: a terminal's Ctrl-C (sent to the foreground process group)
    reaches `sft run` alone, which asks the workers to checkpoint; msrun itself answers SIGINT
    by SIGKILLing every worker (its workers are in sessions of their own, so they never get the
    terminal's signal). Aborting (a second Ctrl-C) sends msrun that SIGINT."""
    with subprocess.Popen(
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    ) as proc:
        try:
            return proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGINT)  # msrun: kill the workers and the scheduler
            proc.wait()
            raise


class LogTailer:
    """Reads log files as workers write them, from a thread: each call of `on_output(i, text)`
    gets the bytes of `logs[i]` written since the previous read (by file offset, so nothing is
    missed or read twice); a last read when the block ends drains what remains."""

    def __init__(self, logs: list[Path], on_output: Any, interval: float = 0.2) -> None:
        import threading

        self.logs, self.on_output, self.interval = logs, on_output, interval
        self.offsets = [0] * len(logs)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="sft-log-tailer", daemon=True)

    def __enter__(self) -> LogTailer:
        if self.on_output is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.on_output is not None:
            self.stop.set()
            self.thread.join()
            self.read()

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            self.read()

    def read(self) -> None:
        for i, log in enumerate(self.logs):
            try:
                with log.open("rb") as f:
                    f.seek(self.offsets[i])
                    data = f.read()
            except FileNotFoundError:
                continue
            # up to the last newline only: a multi-byte character is never cut in two
            end = data.rfind(b"\n") + 1
            if end:
                self.offsets[i] += end
                self.on_output(i, data[:end].decode(errors="replace"))


def _run_rank_table(procs: list[Process], work_dir: Path, threads: int) -> None:
    """Start one process per local device; when one fails, stop the others and report it."""
    running = []
    for p in procs:
        f = p.log.open("w")
        popen = subprocess.Popen(
            p.argv, env=worker_env(work_dir, threads, p.env), stdout=f, stderr=subprocess.STDOUT
        )
        running.append((p, popen, f))
    failed = None
    try:
        while failed is None and any(popen.poll() is None for _, popen, _ in running):
            for p, popen, _ in running:
                rc = popen.poll()
                if rc:  # the first rank that fails stops the others
                    failed = (int(p.env["RANK_ID"]), p.log, rc)
                    break
            time.sleep(0.2)
        failed = failed or next(
            (
                (int(p.env["RANK_ID"]), p.log, popen.returncode)
                for p, popen, _ in running
                if popen.returncode
            ),
            None,
        )
    finally:
        for _, popen, f in running:
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
            popen.wait()
            f.close()
    if failed is not None:
        raise SftError(_failure(*failed))


def _run_showing_progress(
    cmd: list[str], env: dict[str, str], log: Path, show: bool = True, on_output: Any = None
) -> int:
    """Run one worker, everything into `log`; its per-step loss lines also go to stdout so a
    long run shows progress (MindFormers' other output stays in the log), or, with
    `on_output`, each line goes to it (the caller shows progress)."""
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
        with ForwardSignals([proc]) as fwd:
            for line in proc.stdout:
                _echo(line, f, show, on_output)
            rc = proc.wait()
        if fwd.requested and rc in (128 + signal.SIGTERM, 128 + signal.SIGINT):
            raise Stopped(fwd.requested)
        return rc


def _echo(line: str, f: Any, show: bool, on_output: Any) -> None:
    """One line of the worker: into its log, then to `on_output` or (a loss line) stdout."""
    f.write(line)
    if on_output is not None:
        f.flush()
        on_output(0, line)
        return
    m = _PROGRESS.search(line) if show else None
    if m:
        step, total, loss = m.groups()
        print(f"[mindformers] step {step}/{total} loss {loss}", flush=True)


class Stopped(Exception):
    """The workers stopped after a forwarded SIGTERM / SIGINT (they checkpointed first)."""

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        self.signame = signame


class ForwardSignals(StopSignals):
    """While workers run: SIGTERM / SIGINT to `sft run` go on to them (sft's callback in the
    worker then checkpoints at the next step boundary and stops); `requested` names the first.
    Installing and restoring the handlers (main thread only) is core's StopSignals'."""

    def __init__(self, procs: list[Any]) -> None:
        super().__init__()
        self.procs = procs

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            print(
                f"\n[sft] {name} received; the workers checkpoint at the next step boundary "
                "and stop",
                file=sys.stderr,
                flush=True,
            )
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)


class RequestStop(StopSignals):
    """While several workers run: SIGTERM / SIGINT to `sft run` write the stop request the
    workers read at every step end; they agree on one stop step, checkpoint it and exit
    (`sft_mindspore.stopfile`). A second, later Ctrl-C still aborts (KeyboardInterrupt)."""

    def __init__(self, stop: StopFiles) -> None:
        super().__init__()
        self.stop = stop

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.requested is None
        super()._handle(signum, frame)
        if first and self.requested is not None:
            self.stop.request(self.requested)  # the workers agree on a step, checkpoint, stop


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
        str(WORKER),
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
