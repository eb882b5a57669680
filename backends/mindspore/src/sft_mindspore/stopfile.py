"""Agreeing on one stop step across MindFormers workers (msrun, rank tables), through files.

With several data-parallel workers a stop (SIGTERM / SIGINT) must happen at the SAME step on
every rank: a rank that stops alone leaves the others waiting in the next step's gradient
all-reduce forever, and checkpoints of different steps cannot be resumed together. The torch
backend all-reduces a stop flag after every step; a MindFormers callback cannot run a collective
on CPU (MindSpore has no CPU Barrier kernel), so the workers agree through two files in a
directory every worker of the run sees (`SFT_STOP_DIR`, RUN_DIR/mindformers/stop):

- `request`: written by `sft run` when it receives SIGTERM / SIGINT (msrun itself would SIGKILL
  its workers on SIGINT and leave them running on SIGTERM, so sft does not signal msrun);
- `step.json`: the agreed `{"signal", "step"}`, created exclusively (O_EXCL) by the first rank
  that sees a request (the file, or a signal delivered to that worker directly) at the end of
  its step s, with step s + 1.

Why s + 1 is safe: data-parallel ranks are in lockstep. When one rank ends step s, no other
rank can have ended step s + 1 (that needs this rank's gradients of step s + 1), so every rank
checks the file at the end of step s + 1 after it exists; ranks that already passed step s
could not stop at s. A rank that loses the O_EXCL race reads and adopts the winner's step.
Framework-free; `sft run` (launcher) and the workers (`callbacks.SftCheckpointMonitor`) share it.

    stop = StopFiles.from_env()                       # in a worker; None without SFT_STOP_DIR
    signame = stop.should_stop(step, own_signal)      # at every step end: stop now if not None
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

ENV = "SFT_STOP_DIR"


class StopFiles:
    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory)
        self.request_file = self.dir / "request"
        self.step_file = self.dir / "step.json"

    @classmethod
    def from_env(cls) -> StopFiles | None:
        d = os.environ.get(ENV)
        return cls(d) if d else None

    # ---------------------------------------------------------------------- launcher side
    def clear(self) -> None:
        """Before the workers start: a request or agreement of an earlier (stopped) launch goes."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for f in (self.request_file, self.step_file):
            f.unlink(missing_ok=True)

    def request(self, signame: str) -> None:
        """Ask the workers to stop (the first request wins; atomic, never half-written)."""
        if self.request_file.exists():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".request.{os.getpid()}"
        tmp.write_text(signame)
        os.replace(tmp, self.request_file)

    def agreed(self) -> tuple[str, int] | None:
        """(signal name, step) the workers agreed to stop at, or None."""
        try:
            doc = json.loads(self.step_file.read_text())
            return str(doc["signal"]), int(doc["step"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    # ------------------------------------------------------------------------ worker side
    def requested(self) -> str | None:
        try:
            return self.request_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def propose(self, signame: str, step: int) -> tuple[str, int]:
        """Create step.json with (signame, step) unless a rank did first; returns the agreed."""
        data = json.dumps({"signal": signame, "step": step, "by_pid": os.getpid()})
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".step.{os.getpid()}.{uuid.uuid4().hex}"  # unique per caller
        tmp.write_text(data)
        try:
            os.link(tmp, self.step_file)  # atomic and exclusive: never a half-written file
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        agreed = self.agreed()
        assert agreed is not None, f"{self.step_file} unreadable"
        return agreed

    def should_stop(self, step: int, own_signal: str | None) -> str | None:
        """At the end of optimizer step `step`: the signal name when this rank must checkpoint
        this step and stop, else None. `own_signal`: a stop signal this worker received."""
        agreed = self.agreed()
        if agreed is None:
            signame = own_signal or self.requested()
            if signame is None:
                return None
            agreed = self.propose(signame, step + 1)
        signame, at = agreed
        return signame if step >= at else None
