"""benchmarks/gpu_check.py (issue #20): its dry run (the CPU side of the GPU checks) passes here,
and the working tree plus the GPU wheels fit what the device tool carries.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_gpu_check.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.torch

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def gpu_check(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bundle_fits_the_device_carry() -> None:
    out = gpu_check("--check-bundle")
    assert out.returncode == 0 and out.stdout.startswith("PASS bundle"), out.stdout + out.stderr


def test_unknown_check_is_a_usage_error() -> None:
    out = gpu_check("--dry-run", "--only", "packed-equals-unpackt")
    assert out.returncode == 2 and "known: precision-decision" in out.stderr


@pytest.mark.slow
def test_dry_run_passes_on_cpu() -> None:
    """The checks with a CPU side: decisions on faked GPUs, fp16 loss scaling with CPU
    autocast, packed = unpacked through `sft run`, and `sft bench`'s report on CPU."""
    checks = ["precision-decision", "fp16-loss-scaling", "packed-equals-unpacked", "bench-mfu"]
    out = gpu_check("--dry-run", "--only", ",".join(checks))
    lines = [line for line in out.stdout.splitlines() if line.split(" ")[0] in ("PASS", "FAIL")]
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert [line.split(" ")[1].rstrip(":") for line in lines] == checks
    assert all(line.startswith("PASS") for line in lines), lines
