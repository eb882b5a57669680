"""Acceptance of exact resume, preemption and the NaN policy, end to end through `sft run`
subprocesses on a tiny llama (fp32, CPU, 1 thread, deterministic):

- killed with SIGKILL at a random step (when metrics.jsonl reaches it) and resumed with
  `--resume auto`: final weights BITWISE equal to an uninterrupted run, same per-step losses
  (LoRA and full fine-tuning);
- SIGKILLed inside a checkpoint write (SFT_TEST_CRASH_IN_SAVE): the previous checkpoint is
  resumed and the result is still bitwise equal;
- SIGTERM mid-run: exit 143 within one step with a complete checkpoint of the step it finished;
  the resumed run is bitwise equal;
- NaN injected at step k (SFT_TEST_INJECT_NAN_STEP): stops with exit 3 naming step k and its
  samples; with `nan_policy: skip` step k changes no weight and does not advance the LR.

    $ .venvs/torch/bin/python -m pytest tests/reliability/test_resume_e2e.py -q
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

pytest.importorskip("torch")
from safetensors.numpy import load_file
from sft.checkpoints import complete_checkpoints
from sft.events import read_metrics
from sft.rundir import find_final_weights

from tests.reliability.e2e import make_workdir

pytestmark = [pytest.mark.torch, pytest.mark.slow]

STEPS = 10


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    d = tmp_path_factory.mktemp("resume")
    return make_workdir(d, tiny_llama, 48)


def job(workdir: Path, name: str, method: str, **train: Any) -> Path:
    """A job spec whose run directory is workdir/name. LoRA dropout stays on (0.05), so the
    resumed run is only equal if the RNG state is restored too."""
    spec = {
        "model": str(workdir / "model"),
        "data": {"train": "train.jsonl", "max_seq_len": 128, "eval_fraction": 0.1},
        "eval": {"every_steps": 3},  # evaluation in between must not disturb the training state
        "method": method,
        "train": {
            "max_steps": STEPS,
            "precision": "fp32",
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "learning_rate": 1e-2,
            "warmup_steps": 2,
            "seed": 7,
            "deterministic": True,
            **train,
        },
        "checkpoint": {"every_steps": 1, "keep_last": 20},
        "logging": {"plot": False, "progress": False},
        "torch": {"device": "cpu", "num_threads": 1},
        "output_dir": str(workdir / name),
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its children: torchrun starts its workers in their own sessions,
    so a process group kill would miss them (a machine crash would not)."""
    children = [
        int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == pid
    ]
    for p in [pid, *children]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _ppid(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def sft_run(cfg: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sft", "run", "--config", str(cfg), *args],
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, expect: int = 0) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}:\n{out}"
    assert "Traceback" not in out, out
    return out


def logged_steps(run_dir: Path) -> list[int]:
    """Steps with a loss in metrics.jsonl so far, safe to call while the run writes it."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    complete = text[: text.rfind("\n") + 1].splitlines()  # not a line still being written
    return [r["step"] for r in map(json.loads, filter(str.strip, complete)) if "loss" in r]


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    """Poll metrics.jsonl until `step` is logged (the process is then at step+1 or saving)."""
    deadline = time.time() + 240
    while time.time() < deadline:
        if max(logged_steps(run_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(
                f"run ended (exit {proc.returncode}) before step {step}:\n"
                f"{proc.stdout.read() if proc.stdout else ''}"
            )
        time.sleep(0.01)
    pytest.fail(f"step {step} never logged")


def losses(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def eval_losses(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): r["eval_loss"] for r in read_metrics(run_dir) if "eval_loss" in r}


def final_weights(run_dir: Path) -> dict[str, np.ndarray]:
    found = find_final_weights(run_dir)
    assert found and not found.legacy, f"no final/adapter or final/model in {run_dir}"
    final = found.weights
    files = sorted(final.glob("*.safetensors"))
    assert files, f"no safetensors in {final}: {os.listdir(final)}"
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
    assert a.keys() == b.keys(), what
    differ = [k for k in a if a[k].dtype != b[k].dtype or a[k].tobytes() != b[k].tobytes()]
    assert not differ, f"{what}: {len(differ)}/{len(a)} tensors differ, e.g. {differ[:3]}"


def assert_same_run(reference: Path, resumed: Path, what: str) -> None:
    ref, got = losses(reference), losses(resumed)
    assert sorted(ref) == list(range(1, STEPS + 1)), ref
    assert got == ref, f"{what}: per-step losses differ\nref {ref}\ngot {got}"
    assert eval_losses(reference) and eval_losses(resumed) == eval_losses(reference), what
    assert_bitwise_equal(final_weights(reference), final_weights(resumed), what)


@pytest.fixture(scope="module")
def lora_reference(workdir: Path) -> Path:
    finish(sft_run(job(workdir, "lora-ref", "lora")))
    return workdir / "lora-ref"


@pytest.fixture(scope="module")
def full_reference(workdir: Path) -> Path:
    finish(sft_run(job(workdir, "full-ref", "full", learning_rate=1e-3)))
    return workdir / "full-ref"


def kill_and_resume(workdir: Path, name: str, method: str, **train: Any) -> int:
    cfg = job(workdir, name, method, **train)
    k = random.randint(2, STEPS - 2)
    proc = sft_run(cfg)
    wait_for_step(proc, workdir / name, k)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    out = finish(sft_run(cfg, "--resume", "auto"))
    summary = json.loads((workdir / name / "summary.json").read_text())
    assert summary["resumed_from"], f"killed at step {k} but the rerun did not resume:\n{out}"
    return k


def test_lora_killed_at_a_random_step_resumes_bitwise(workdir: Path, lora_reference: Path) -> None:
    k = kill_and_resume(workdir, "lora-kill", "lora")
    assert_same_run(lora_reference, workdir / "lora-kill", f"LoRA, SIGKILL after step {k}")


def test_full_killed_at_a_random_step_resumes_bitwise(workdir: Path, full_reference: Path) -> None:
    k = kill_and_resume(workdir, "full-kill", "full", learning_rate=1e-3)
    assert_same_run(full_reference, workdir / "full-kill", f"full, SIGKILL after step {k}")


def test_kill_inside_a_checkpoint_write_resumes_from_the_previous_one(
    workdir: Path, lora_reference: Path
) -> None:
    cfg = job(workdir, "lora-crash", "lora")
    run = workdir / "lora-crash"
    proc = sft_run(cfg, env={"SFT_TEST_CRASH_IN_SAVE": "5"})
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    ckpts = run / "checkpoints"
    partial = [p.name for p in ckpts.iterdir() if p.name.startswith(".tmp-step-000005")]
    assert partial and any((ckpts / partial[0]).iterdir()), "the fault was not mid-save"
    assert not (ckpts / "step-000005").exists()
    out = finish(sft_run(cfg, "--resume", "auto"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-000004"), out
    assert_same_run(lora_reference, run, "LoRA, SIGKILL inside the save of step 5")


def test_sigterm_checkpoints_within_one_step_and_exits_143(
    workdir: Path, full_reference: Path
) -> None:
    cfg = job(workdir, "full-term", "full", learning_rate=1e-3)
    run = workdir / "full-term"
    # Regular checkpoints only every 4 steps, so the preemption checkpoint is the signal's own.
    spec = yaml.safe_load(cfg.read_text())
    spec["checkpoint"]["every_steps"] = 4
    cfg.write_text(yaml.safe_dump(spec))
    proc = sft_run(cfg)
    wait_for_step(proc, run, 5)
    proc.send_signal(signal.SIGTERM)
    at_signal = max(logged_steps(run))  # finished by now (the signal's step may be one)
    out = finish(proc, expect=143)
    assert "SIGTERM" in out and "--resume auto" in out
    logged = max(losses(run))
    saved = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    # The step running when the signal came was finished, logged and checkpointed; no more.
    assert saved[-1] == logged and logged in (at_signal, at_signal + 1), (saved, at_signal, out)
    finish(sft_run(cfg, "--resume", "auto"))
    assert_same_run(full_reference, run, f"full, SIGTERM after step {logged}")


FULL_DISK = """
import shutil
# tests/reliability: a filesystem with 1 KiB free, for the checkpoint disk-space check
shutil.disk_usage = lambda path: shutil._ntuple_diskusage(2**40, 2**40 - 1024, 1024)
"""


def test_a_full_disk_stops_before_writing_a_checkpoint(workdir: Path) -> None:
    cfg = job(workdir, "full-disk", "lora")
    (workdir / "fulldisk").mkdir(exist_ok=True)
    (workdir / "fulldisk" / "sitecustomize.py").write_text(FULL_DISK)
    path = os.pathsep.join([str(workdir / "fulldisk"), os.environ.get("PYTHONPATH", "")])
    out = finish(sft_run(cfg, env={"PYTHONPATH": path}), expect=1)
    assert "not enough disk space for a checkpoint" in out and "MiB needed" in out, out
    assert not list((workdir / "full-disk" / "checkpoints").iterdir())  # nothing half-written


def nan_run(workdir: Path, name: str, step: int, **train: Any) -> tuple[subprocess.Popen, Path]:
    cfg = job(workdir, name, "lora", **train)
    return sft_run(cfg, env={"SFT_TEST_INJECT_NAN_STEP": str(step)}), workdir / name


def test_nan_at_step_k_stops_naming_step_and_samples(workdir: Path) -> None:
    proc, run = nan_run(workdir, "nan-stop", 4)
    out = finish(proc, expect=3)
    assert "at step 4" in out and "train.jsonl:" in out, out
    assert max(losses(run)) == 3  # nothing of step 4 was logged or saved
    assert not (run / "checkpoints" / "step-000004").exists()


def test_nan_skip_leaves_the_weights_and_the_schedule_untouched(workdir: Path) -> None:
    proc, run = nan_run(workdir, "nan-skip", 4, nan_policy="skip")
    out = finish(proc)
    assert "skipped step 4" in out, out
    before = load_file(str(run / "checkpoints" / "step-000003" / "trainable.safetensors"))
    after = load_file(str(run / "checkpoints" / "step-000004" / "trainable.safetensors"))
    assert_bitwise_equal(before, after, "the skipped step 4")
    rows = {int(r["step"]): r for r in read_metrics(run) if "lr" in r}
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert rows[5]["lr"] == rows[4]["lr"], "the LR schedule advanced on a skipped step"
    assert rows[4]["lr"] != rows[3]["lr"]  # (it does advance on every applied step)
    # the skipped step has no loss to report; every other step's loss is finite
    assert "loss" not in rows[4] or not np.isfinite(rows[4]["loss"])
    assert all(np.isfinite(rows[s]["loss"]) for s in rows if s != 4)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metrics"]["skipped_steps"] == [4]


def ddp_job(workdir: Path, name: str) -> Path:
    cfg = job(workdir, name, "lora")
    spec = yaml.safe_load(cfg.read_text())
    spec["parallel"] = {"nproc_per_node": 2}
    spec["train"]["gradient_accumulation_steps"] = 1
    spec["checkpoint"]["every_steps"] = 2
    cfg.write_text(yaml.safe_dump(spec))
    return cfg


PREEMPT_AFTER = 2  # early, so a slow poll still leaves steps for the SIGKILL phase


def test_torchrun_job_preempted_then_killed_resumes_bitwise(workdir: Path) -> None:
    # 2 gloo ranks, LoRA dropout on. SIGTERM to the launcher: its torchrun agent forwards it,
    # the ranks agree, stop after the same step and checkpoint; the launcher exits 143. The
    # resumed job is then SIGKILLed (launcher and workers) at a random step and resumed again:
    # the end result equals an uninterrupted 2-rank run bitwise (every rank's RNG restored).
    finish(sft_run(ddp_job(workdir, "ddp-ref")))
    cfg, run = ddp_job(workdir, "ddp-run"), workdir / "ddp-run"
    proc = sft_run(cfg)
    wait_for_step(proc, run, PREEMPT_AFTER)
    proc.send_signal(signal.SIGTERM)
    at_signal = max(logged_steps(run))
    out = finish(proc, expect=143)
    assert "stopped by SIGTERM after step" in out, out
    saved = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert saved[-1] == max(losses(run)) in (at_signal, at_signal + 1), (saved, out)
    # The SIGKILL phase needs two steps left after the preemption checkpoint. It is never
    # skipped: a machine so loaded that the SIGTERM landed that late fails here, by name.
    if saved[-1] > STEPS - 3:
        pytest.fail(
            f"SIGTERM sent when step {PREEMPT_AFTER} was logged stopped the job only after step "
            f"{saved[-1]} of {STEPS}: no room left for the SIGKILL phase (machine too loaded?)"
        )
    k = random.randint(saved[-1] + 2, STEPS - 1)
    proc = sft_run(cfg, "--resume", "auto")
    wait_for_step(proc, run, k)
    kill_tree(proc.pid)
    assert proc.wait(timeout=60) == -signal.SIGKILL, f"the job ended before the SIGKILL at {k}"
    finish(sft_run(cfg, "--resume", "auto"))
    what = f"DDP LoRA, SIGTERM after step {saved[-1]}, SIGKILL after step {k}"
    assert_same_run(workdir / "ddp-ref", run, what)


def raw_rows(run_dir: Path, kind: str) -> list[int]:
    """Steps of metrics.jsonl's `kind` rows (loss / eval_loss) as written: duplicates kept."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if kind in r]


def test_sigkill_between_checkpoints_logs_each_step_once(
    workdir: Path, lora_reference: Path
) -> None:
    """Checkpoints every 3 steps, SIGKILL after step 4 or 5: the resumed run restarts after
    step 3 and logs 4.. again; metrics.jsonl must hold each step once."""
    cfg, run = job(workdir, "lora-gap", "lora"), workdir / "lora-gap"
    spec = yaml.safe_load(cfg.read_text())
    spec["checkpoint"]["every_steps"] = 3
    cfg.write_text(yaml.safe_dump(spec))
    k = random.choice([4, 5])
    proc = sft_run(cfg)
    wait_for_step(proc, run, k)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert max(raw_rows(run, "loss")) > 3, "nothing logged after the checkpoint: no test"
    # a busy host may let the run pass the step-6 checkpoint before the kill lands (as CI once
    # saw on the MindSpore twin of this test): the resume starts from the newest complete one
    at = int(complete_checkpoints(run)[-1].name.split("-")[1])
    assert at in (3, 6), at
    out = finish(sft_run(cfg, "--resume", "auto"))
    assert (
        f"resuming from the checkpoint of step {at} ({run / 'checkpoints' / f'step-{at:06d}'})"
        in out
    )
    assert raw_rows(run, "loss") == list(range(1, STEPS + 1)), (k, raw_rows(run, "loss"))
    assert raw_rows(run, "eval_loss") == sorted(set(raw_rows(run, "eval_loss"))), k
    assert_same_run(lora_reference, run, f"LoRA, SIGKILL after step {k}, checkpoints every 3")
    # (TensorBoard's side: tests/plugins/test_tensorboard.py)
    # the run is finished: resuming it again says so, trains nothing and exits 0
    before = (run / "metrics.jsonl").read_text()
    out = finish(sft_run(cfg, "--resume", "auto"))
    assert f"{run} already finished ({STEPS} steps" in out and "final loss None" not in out, out
    assert (run / "metrics.jsonl").read_text() == before
