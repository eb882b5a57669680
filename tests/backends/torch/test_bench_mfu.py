"""`sft bench` MFU on GPUs (issue #20, item 9), tested on CPU: the peak table lookup, the
precision whose rate counts, the size of the GPU probe, and the report's arithmetic.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_bench_mfu.py -q
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from sft_torch import bench
from sft_torch.bench import Setup, StepWork, compute_key, peak_flops

pytestmark = pytest.mark.torch


@pytest.mark.parametrize(
    ("name", "key", "tflops"),
    [
        ("NVIDIA H200", "bf16", 989.4),
        ("NVIDIA H100 80GB HBM3", "fp16", 989.4),
        ("NVIDIA H100 PCIe", "bf16", 756.0),  # not the SXM row
        ("NVIDIA A100-SXM4-80GB", "tf32", 156.0),
        ("NVIDIA A10G", "bf16", 70.0),  # not the A10 row
        ("NVIDIA A10", "bf16", 125.0),
        ("NVIDIA L40S", "fp16", 362.05),  # not the L4 row
        ("NVIDIA L4", "bf16", 121.0),
        ("Tesla T4", "fp16", 65.0),
        ("Tesla T4", "bf16", None),  # emulated only: no peak to divide by
        ("Tesla V100-PCIE-16GB", "fp16", 112.0),
        ("Tesla V100-SXM2-32GB", "fp32", 15.7),
        ("NVIDIA GeForce RTX 3090", "bf16", None),  # not in the table
    ],
)
def test_peak_table(name: str, key: str, tflops: float | None) -> None:
    got = peak_flops(name, key)
    assert got == (None if tflops is None else pytest.approx(tflops * 1e12))


def test_compute_key_is_the_precision_actually_used() -> None:
    assert compute_key("fp16", "cuda") == "fp16"
    assert compute_key("bf16", "cuda") == "bf16"
    assert compute_key("fp32", "cuda", tf32=True) == "tf32"
    assert compute_key("fp32", "cuda", tf32=False) == "fp32"
    assert compute_key("fp32", "cpu", tf32=True) == "fp32"


def test_gpu_probe_is_a_large_gemm_in_the_run_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the probe is sustained 8192-square GEMMs (a 1024-square one is launch- and
    sync-bound), in fp32 and in the run's compute, tf32 with tensor cores allowed."""
    calls: list[tuple[Any, int | None, bool]] = []

    def fake_rate(dtype: Any, device: Any, size: int | None = None, seconds: float = 0.3) -> float:
        calls.append((dtype, size, torch.backends.cuda.matmul.allow_tf32))
        return 1.0

    monkeypatch.setattr(bench, "gemm_rate", fake_rate)
    cuda = SimpleNamespace(type="cuda")
    assert set(bench.gemm_probe(cuda, "tf32")) == {"fp32", "tf32"}
    assert calls == [(torch.float32, 8192, False), (torch.float32, 8192, True)]
    calls.clear()
    assert set(bench.gemm_probe(cuda, "fp16")) == {"fp32", "fp16"}
    assert [(c[0], c[1]) for c in calls] == [(torch.float32, 8192), (torch.float16, 8192)]


def fake_run(steps: int = 4, seconds_per_step: float = 0.5) -> tuple[list[StepWork], Any]:
    work = [StepWork(trained=500, tokens=1000, slots=1100, attn_units=20000) for _ in range(steps)]
    trained = tokens = 0
    counts = []
    for w in work:
        trained, tokens = trained + w.trained, tokens + w.tokens
        counts.append((trained, tokens))
    events = SimpleNamespace(
        step_times=[seconds_per_step * i for i in range(steps)],
        step_usage=[(100 * i * i, 0.5 * i) for i in range(steps)],  # (minor faults, system s)
        losses=[1.0] * steps,
        loop_counts=counts,
        info={},
    )
    return work, events


def test_report_divides_by_the_used_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """An fp16 run on an H100: the GEMM fraction is against the fp16 probe (it was against the
    fp32 probe, 15x too flattering) and MFU against the fp16 dense peak."""
    work, events = fake_run()
    flops = bench.FlopModel(
        per_token=6e9, per_trained_token=1e9, per_attn_unit=1e4, params=10**9, trainable_params=1
    )
    st = Setup(torch.device("cuda", 0), 1, "fp16", {}, "NVIDIA H100 80GB HBM3", "fp16")
    cfg = SimpleNamespace(
        model=SimpleNamespace(name_or_path="m"), method=SimpleNamespace(name="full")
    )
    rates = {"fp32": 50e12, "fp16": 700e12}
    r = bench.report(
        cfg,
        st,
        work,
        flops,
        events,
        rates,
        {"peak_rss_mib": 1.0},
        setup_s=1.0,
        first_step_s=1.0,
        probe_s=0.1,
        config_path=SimpleNamespace(),
    )
    per_step = 6e9 * 1000 + 1e9 * 500 + 1e4 * 20000
    achieved = 3 * per_step / 1.5  # 3 measured steps in 1.5 s
    assert r["achieved_flops"] == pytest.approx(achieved)
    assert r["gemm_fraction"] == pytest.approx(achieved / 700e12)
    assert r["mfu"] == pytest.approx(achieved / 989.4e12)
    text = bench.format_report({**r, "config": "c", "levers": {}, "cpu_features": []})
    assert "MFU" in text and "fp16 dense peak (989 TFLOP/s)" in text
    assert "sustained 8192-square" in text
    # per-step differences of the cumulative getrusage counters (4 steps: 3 measured)
    assert r["step_minor_faults"] == [100, 300, 500] and r["step_system_s"] == [0.5, 0.5, 0.5]
    assert "300 minor faults, 0.50 s system CPU per measured step (median)" in text
