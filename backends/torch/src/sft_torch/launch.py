"""How `sft run` becomes a multi-process job: re-launch through torchrun, and report a rank
that fails as one clear error.

    $ sft run --config cfg.yaml parallel.nproc_per_node=2                  # one node, 2 procs
    $ sft run --config cfg.yaml parallel.nnodes=2 parallel.node_rank=0 \\
          parallel.master_addr=10.0.0.1 parallel.master_port=29500         # on each node
    $ torchrun --nproc_per_node 8 -m sft run --config cfg.yaml parallel.nproc_per_node=8

`TorchBackend.train` calls `run_training(plan, events)`:

- world size 1, or already inside a torchrun worker: train here (joining the process group
  first when WORLD_SIZE > 1, and recording a failure where torchrun's agent can read it);
- otherwise this process is the launcher: `sft run` has already prepared the data cache (it is
  content-hashed, so the workers only read it); torchrun's elastic agent (in-process,
  `torch.distributed.run`) starts `python -m sft run --config RUN/launch-config[-nodeN].yaml` (the
  launcher's validated spec) on every local rank and waits. A rank that raises is recorded in its error file; the agent
  then stops the others and the launcher raises `SftError` naming the rank, the cause and the
  log file. On success the launcher returns rank 0's result from RUN/summary.json.

`SFT_FAULT_RANK=N` makes rank N fail on purpose right after joining the process group, to check
what your cluster does with a failed job (and in the tests).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import yaml
from sft.backend import TrainPlan, TrainResult
from sft.errors import SftError
from sft.events import RunEvents
from sft.run import WORKER_ENV
from sft.rundir import summary_path

from sft_torch import distributed
from sft_torch.imports import import_train
from sft_torch.options import torch_options
from sft_torch.strategy import check_strategy

FAULT_ENV = "SFT_FAULT_RANK"


def needs_launch(plan: TrainPlan) -> bool:
    return plan.config.parallel.world_size > 1 and not distributed.in_launcher_worker()


def run_training(plan: TrainPlan, events: RunEvents) -> TrainResult:
    """Train `plan` in this process, or launch the processes that will (see module docstring)."""
    if needs_launch(plan):
        return launch(plan)
    train = import_train(plan.config.method.name)

    if not distributed.in_launcher_worker():
        return train(plan, events)
    created = distributed.init_process_group(plan)
    try:
        inject_fault()
        return train(plan, events)
    except BaseException as exc:
        record_failure(exc)
        raise
    finally:
        if created:
            distributed.destroy_process_group()


def inject_fault() -> None:
    wanted = os.environ.get(FAULT_ENV)
    if wanted is not None and wanted.strip() == str(distributed.rank()):
        raise SftError(f"injected failure on rank {wanted} ({FAULT_ENV}={wanted})")


def record_failure(exc: BaseException) -> None:
    """Write the exception to the error file torchrun's agent gave this worker, so the
    launcher can say which rank failed and why (torchrun's own `@record`, without its
    decorator, because the CLI catches SftError before it would see it)."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE") or isinstance(exc, KeyboardInterrupt):
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(exc)


# -------------------------------------------------------------------------------- launcher


def torchrun_args(plan: TrainPlan, log_dir: Path) -> list[str]:
    """The torchrun command line that runs this plan's resolved config on every rank."""
    par = plan.config.parallel
    args = [
        f"--nproc_per_node={par.nproc_per_node}",
        f"--nnodes={par.nnodes}",
        "--max_restarts=0",
        "--monitor_interval=0.5",
        f"--log_dir={log_dir}",
        "--tee=3",
    ]
    if par.nnodes == 1:
        # a free port on this machine: two single-node jobs never collide on master_port
        args.append("--standalone")
    else:
        args += [
            f"--node_rank={par.node_rank}",
            f"--master_addr={par.master_addr}",
            f"--master_port={par.master_port}",
        ]
    return [*args, "-m", "sft", "run", "--config", str(worker_config(plan))]


def worker_config(plan: TrainPlan) -> Path:
    """The spec the workers load: only the fields the user set (plus the run directory), so
    each worker validates exactly the config the launcher did. (A full dump would also mark
    every default as set, and the data cache key notices which fields were given.) One file per
    node when there are several: nodes share the run directory and differ in node_rank, so one
    shared file would hand a node the other's rank."""
    config = plan.config
    data = config.model_dump(mode="json", exclude_unset=True, exclude={"backend_options"})
    data.update(config.backend_options)
    data["output_dir"] = str(plan.run_dir)
    par = config.parallel
    name = "launch-config.yaml" if par.nnodes == 1 else f"launch-config-node{par.node_rank}.yaml"
    path = plan.run_dir / name
    path.write_text(
        "# Written by sft for the torchrun workers of this run\n"
        + yaml.safe_dump(data, sort_keys=False)
    )
    return path


def launch(plan: TrainPlan) -> TrainResult:
    """Start this node's processes with torchrun's elastic agent and wait for them."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    par = plan.config.parallel
    device = "cuda" if distributed.uses_cuda(torch_options(plan).device) else "cpu"
    check_strategy(plan.config, device)  # fail here, not in every worker
    log_dir = plan.run_dir / "logs" / f"node{par.node_rank}"
    log_dir.mkdir(parents=True, exist_ok=True)
    if par.node_rank == 0:
        summary_path(plan.run_dir).unlink(missing_ok=True)  # never report a stale one
    args = parse_args(torchrun_args(plan, log_dir))
    print(
        f"sft: launching {plan.config.parallel.world_size} processes with torchrun "
        f"(logs: {log_dir})",
        file=sys.stderr,
        flush=True,
    )
    os.environ[WORKER_ENV] = "1"  # the workers train; this launcher evaluates and exports
    try:
        torchrun(args)
    except ChildFailedError as exc:
        raise SftError(describe_failure(exc, log_dir)) from None
    except SignalException as exc:
        # Preempted (sft_torch.guard): the agent forwarded the signal to the workers, which
        # finished their step and checkpointed; exit 143/130 like a single process would.
        raise preempted(plan, exc.sigval) from None
    finally:
        os.environ.pop(WORKER_ENV, None)
    if par.node_rank != 0:
        # This launcher speaks for the ranks of its node, none of them rank 0: mark it as
        # such so `sft run` leaves the run's summary.json to node 0 (shared run directory).
        os.environ["RANK"] = str(par.node_rank * par.nproc_per_node)
        return TrainResult(steps=0, final_loss=None, metrics={"node_rank": par.node_rank})
    return result_of(plan.run_dir)


def preempted(plan: TrainPlan, sigval: Any) -> SftError:
    """The launcher's `Preempted` after a stop signal, naming the newest complete checkpoint."""
    from sft.checkpoints import latest_checkpoint, read_meta
    from sft.guard import Preempted

    name = signal.Signals(int(sigval)).name
    ckpt = latest_checkpoint(plan.run_dir)
    step = int(read_meta(ckpt)["step"]) if ckpt else 0
    if ckpt is None and plan.config.parallel.node_rank != 0:
        step = -1  # rank 0 (on node 0) writes checkpoints; this node may not see its disk
    return Preempted(name, step, ckpt)


def describe_failure(exc: Any, log_dir: Path) -> str:
    """One message naming the first failed rank, its error and where its logs are."""
    rank, failure = first_failure(exc.failures) or exc.get_first_failure()
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    if not message or "To enable traceback" in str(message):
        message = f"exit code {failure.exitcode}"
    where = failure.error_file if failure.error_file and failure.error_file != "<N/A>" else ""
    # ranks the agent stopped by signal after the first failure are not news; others with an
    # error of their own (e.g. a lost peer) are worth naming
    others = sorted(r for r, f in exc.failures.items() if r != rank and f.exitcode > 0)
    also = f" (ranks {others} failed too)" if others else ""
    return (
        f"distributed training failed: rank {rank} (local rank {failure.local_rank}) "
        f"stopped with: {message}{also}. The other ranks were stopped. Logs of every rank: "
        f"{log_dir}" + (f"; error file: {where}" if where else "")
    )


def first_failure(failures: dict[int, Any]) -> tuple[int, Any] | None:
    """The failure whose error file was written first. torchrun orders failures by a timestamp
    in whole seconds, so a rank that only lost its peer can tie with the one that crashed;
    the file times tell them apart."""
    written = []
    for r, f in failures.items():
        if f.error_file and os.path.isfile(f.error_file):
            written.append((os.path.getmtime(f.error_file), r, f))
    if not written:
        return None
    _, r, f = min(written, key=lambda item: (item[0], item[1]))
    return r, f


def result_of(run_dir: Path) -> TrainResult:
    """Rank 0's TrainResult, read back from the summary.json it wrote."""
    path = summary_path(run_dir)
    if not path.exists():
        raise SftError(f"the workers finished but rank 0 wrote no {path}; see {run_dir}/logs")
    summary = json.loads(path.read_text())
    return TrainResult(
        steps=summary["steps"],
        final_loss=summary["final_loss"],
        outputs=summary.get("outputs", {}),
        metrics=summary.get("metrics", {}),
    )
