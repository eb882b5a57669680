"""`torch.release_memory` (sft_torch.runtime.release_freed_memory): freed tensors leave the RSS.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_release_memory.py

In a fresh process, 200 MiB of 1 MiB tensors interleaved with live 256 KiB ones are freed; with
the lever the RSS drops by about that much, with glibc's default (the control) it does not,
because glibc's threshold rose past 1 MiB when the first large block was freed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = [
    pytest.mark.torch,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt"),
]

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from sft_torch import runtime
    if sys.argv[1] == "on":
        assert runtime.release_freed_memory()
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    big = torch.ones(1 << 20)  # 4 MiB, freed: glibc's default threshold rises past it
    del big
    keep, tmp = [], []
    for _ in range(200):
        keep.append(torch.ones(64 * 1024))  # 256 KiB, stays
        tmp.append(torch.ones(256 * 1024))  # 1 MiB, freed below
    before = rss()
    del tmp
    print(before - rss())
    """
)


def freed_mib(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def test_freed_tensors_go_back_to_the_os():
    assert freed_mib("on") > 150
    assert freed_mib("off") < 50  # control: glibc's default keeps them
