"""Exact resume on the MindSpore backend with a real SIGKILL, end to end through `sft run`
subprocesses on a tiny llama (LoRA, fp32, CPU, 1 thread):

- killed (SIGKILL to `sft run` and the MindFormers worker, its whole process group) after a step
  between two checkpoints, then `--resume auto`: the console names the checkpoint (step, path),
  the final weights are BITWISE equal to an uninterrupted run's, metrics.jsonl has every step
  exactly once, in order, with the uninterrupted run's losses;
- SIGTERM to `sft run` (its pid only, as a scheduler sends it): the worker writes a checkpoint
  at the next step boundary, `sft run` exits 143 naming it, and the resumed run is bitwise equal;
- `--resume auto` on the finished run says so and exits 0 without training.

    $ .venvs/ms/bin/python -m pytest tests/reliability/test_resume_mindspore_e2e.py -q
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("mindspore")

from sft_mindspore.weights import load_ckpt

from tests.reliability.e2e import finish, make_workdir, sft_run

pytestmark = [pytest.mark.mindspore, pytest.mark.slow]

STEPS, EVERY = 8, 3  # checkpoints at steps 3 and 6 (and 8)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    d = tmp_path_factory.mktemp("ms-resume")
    return make_workdir(d, tiny_llama, 48)


def job(workdir: Path, name: str, every: int = EVERY) -> Path:
    spec = {
        "backend": "mindspore",
        "model": str(workdir / "model"),
        "data": {"train": str(workdir / "train.jsonl"), "max_seq_len": 128, "packing": False},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "train": {
            "max_steps": STEPS,
            "micro_batch_size": 2,
            "learning_rate": 1e-2,
            "warmup_steps": 2,
            "seed": 7,
        },
        "checkpoint": {"every_steps": every, "keep_last": 5},
        "logging": {"plot": False, "progress": False},
        "mindspore": {"device_target": "CPU", "threads": 1},
        "output_dir": str(workdir / name),
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def worker_step(run_dir: Path) -> int:
    """The last step MindFormers' loss monitor logged in the worker's log."""
    log = run_dir / "mindformers" / "worker_0.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return max((int(s) for s in re.findall(r"step:\[\s*(\d+)/", text)), default=0)


def train_steps(run_dir: Path) -> list[int]:
    """The steps of metrics.jsonl's training rows, raw (duplicates kept), in file order; safe
    while the run writes it (a line not yet complete is left out)."""
    text = (run_dir / "metrics.jsonl").read_text()
    lines = text[: text.rfind("\n") + 1].splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.fixture(scope="module")
def reference(workdir: Path) -> Path:
    finish(sft_run(job(workdir, "ref")))
    return workdir / "ref"


def test_sigkill_between_checkpoints_resumes_bitwise_with_each_step_once(
    workdir: Path, reference: Path
) -> None:
    cfg, run = job(workdir, "kill"), workdir / "kill"
    k = random.choice([4, 5])  # after the step-3 checkpoint, before the step-6 one
    proc = sft_run(cfg)
    deadline = time.time() + 500
    while worker_step(run) < k:
        assert proc.poll() is None, f"run ended before step {k}: {proc.communicate()[0]}"
        assert time.time() < deadline, f"step {k} never logged"
        time.sleep(0.05)
    # live metrics: the rows are in metrics.jsonl while MindFormers still trains, each once
    while not (run / "metrics.jsonl").exists() or len(train_steps(run)) < k:
        assert proc.poll() is None and time.time() < deadline, "no live rows"
        time.sleep(0.05)
    live = train_steps(run)
    assert live == list(range(1, len(live) + 1)), live
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = worker_step(run)
    assert killed_at < STEPS, "the worker finished before the kill"
    # The worker trains on while the live rows are awaited: on a slow or busy host it may pass
    # the step-6 checkpoint too (CI saw it once). The resume starts from the newest checkpoint
    # meta.json records (a kill between a .ckpt and its meta.json leaves the one before).
    meta = run / "mindformers" / "output" / "checkpoint" / "rank_0" / "meta.json"
    at = int(json.loads(meta.read_text())["sft_global_step"])
    assert at in (3, 6) and at <= killed_at, (at, killed_at)

    out = finish(sft_run(cfg, "--resume", "auto"))
    ckpt = run / "mindformers" / "output" / "checkpoint" / "rank_0" / f"sft_rank_0-1_{at}.ckpt"
    assert f"resuming from the MindFormers checkpoint of step {at} ({ckpt})" in out, out
    assert train_steps(run) == list(range(1, STEPS + 1)), (k, train_steps(run))
    assert losses(run) == losses(reference), f"SIGKILL after step {killed_at}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metrics"]["resumed_at_step"] == at
    a = load_ckpt(reference / "final" / "mindspore" / "model.ckpt")
    b = load_ckpt(run / "final" / "mindspore" / "model.ckpt")
    assert a.keys() == b.keys()
    differ = [n for n in a if a[n].data.tobytes() != b[n].data.tobytes()]
    assert not differ, (
        f"SIGKILL after step {killed_at}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    )
    assert np.array_equal(a[next(iter(a))].data, b[next(iter(b))].data)


def test_resume_auto_on_a_finished_run_says_so_and_exits_0(reference: Path, workdir: Path) -> None:
    before = (reference / "metrics.jsonl").read_text()
    t0 = time.time()
    out = finish(sft_run(job(workdir, "ref"), "--resume", "auto"))
    assert f"{reference} already finished ({STEPS} steps" in out, out
    assert "epoch must bigger" not in out and "final loss None" not in out, out
    assert (reference / "metrics.jsonl").read_text() == before
    assert time.time() - t0 < 60  # nothing was trained or compiled


def test_killed_after_training_before_the_summary_exports_and_keeps_every_row(
    reference: Path, workdir: Path
) -> None:
    """The state a SIGKILL during the export leaves: every step checkpointed, no summary, no
    final weights, and metrics.jsonl two rows short (`sft run` had not read the last log lines
    yet). `--resume auto` trains nothing, recovers the two rows from the worker log, and
    exports the final weights bitwise equal to the uninterrupted run's."""
    run = workdir / "export-kill"
    shutil.copytree(reference, run)
    (run / "summary.json").unlink()
    shutil.rmtree(run / "final")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(
        "".join(ln for ln in lines if json.loads(ln)["step"] <= STEPS - 2)
    )
    cfg = job(workdir, "export-kill")
    out = finish(sft_run(cfg, "--resume", "auto"))
    assert f"all {STEPS} steps were trained; exporting step {STEPS}" in out, out
    assert f"2 row(s) up to step {STEPS} recovered" in out, out
    assert train_steps(run) == list(range(1, STEPS + 1)), train_steps(run)
    assert losses(run) == losses(reference)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_loss"] == losses(reference)[STEPS], summary
    a = load_ckpt(reference / "final" / "mindspore" / "model.ckpt")
    b = load_ckpt(run / "final" / "mindspore" / "model.ckpt")
    assert a.keys() == b.keys()
    assert not [n for n in a if a[n].data.tobytes() != b[n].data.tobytes()]


def assert_same_as_reference(run: Path, reference: Path, what: str) -> None:
    assert train_steps(run) == list(range(1, STEPS + 1)), (what, train_steps(run))
    assert losses(run) == losses(reference), what
    a = load_ckpt(reference / "final" / "mindspore" / "model.ckpt")
    b = load_ckpt(run / "final" / "mindspore" / "model.ckpt")
    differ = [n for n in a if a[n].data.tobytes() != b[n].data.tobytes()]
    assert a.keys() == b.keys() and not differ, f"{what}: {differ[:3]}"


def test_sigterm_checkpoints_at_the_next_step_and_exits_143(workdir: Path, reference: Path) -> None:
    cfg, run = job(workdir, "term", every=100), workdir / "term"  # no regular checkpoint
    proc = sft_run(cfg)
    deadline = time.time() + 500
    while not (run / "metrics.jsonl").exists() or len(train_steps(run)) < 4:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    # the worker's own log, not metrics.jsonl: `sft run` writes the rows a little behind it
    at_signal = worker_step(run)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, f"exit {proc.returncode}:\n{out}"
    assert "Traceback" not in out and "SIGTERM" in out and "--resume auto" in out, out
    saved = sorted(
        int(p.stem.rsplit("_", 1)[1])
        for p in run.glob("mindformers/output/checkpoint/rank_0/*.ckpt")
    )
    logged = max(train_steps(run))
    assert saved == [logged] and logged in (at_signal, at_signal + 1), (saved, at_signal, out)
    assert f"stopped by SIGTERM after step {logged}" in out, out
    out = finish(sft_run(cfg, "--resume", "auto"))
    assert f"resuming from the MindFormers checkpoint of step {logged}" in out, out
    assert_same_as_reference(run, reference, f"SIGTERM after step {logged}")


def test_a_worker_that_dies_leaves_its_last_checkpoint_and_says_how_to_resume(
    workdir: Path, reference: Path
) -> None:
    """The MindFormers worker alone is killed (as the kernel's OOM killer would) after the step-3
    checkpoint: `sft run` fails naming the intact checkpoint and `--resume auto`, and the resumed
    run is bitwise equal to the uninterrupted one."""
    import psutil

    cfg, run = job(workdir, "crash"), workdir / "crash"
    proc = sft_run(cfg)
    deadline = time.time() + 500
    while worker_step(run) < 4:
        assert proc.poll() is None, f"run ended before step 4: {proc.communicate()[0]}"
        assert time.time() < deadline, "step 4 never logged"
        time.sleep(0.05)
    workers = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if any(a.endswith("sft_mindspore/worker.py") for a in p.cmdline())
    ]
    assert len(workers) == 1, [p.cmdline() for p in workers]
    workers[0].kill()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode not in (0, 143, 130), f"exit {proc.returncode}:\n{out}"
    # a slow host may have let the worker pass the step-6 checkpoint before the kill landed
    meta = run / "mindformers" / "output" / "checkpoint" / "rank_0" / "meta.json"
    at = int(json.loads(meta.read_text())["sft_global_step"])
    assert at in (3, 6), at
    ckpt = run / "mindformers" / "output" / "checkpoint" / "rank_0" / f"sft_rank_0-1_{at}.ckpt"
    assert f"The checkpoint of step {at} ({ckpt}) is intact" in out, out
    assert "--resume auto" in out and "Traceback" not in out, out
    out = finish(sft_run(cfg, "--resume", "auto"))
    assert f"resuming from the MindFormers checkpoint of step {at} ({ckpt})" in out, out
    assert_same_as_reference(run, reference, f"worker killed after step {at}")
