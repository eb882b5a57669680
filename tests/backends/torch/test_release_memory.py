"""`torch.release_memory`: `true` returns freed tensors to the OS at once
(sft_torch.runtime.release_freed_memory); `false`, on CPU, keeps them for the next step
(sft_torch.runtime.keep_freed_memory).

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_release_memory.py

In a fresh process, 200 MiB of 1 MiB tensors interleaved with live 256 KiB ones are freed; with
the lever the RSS drops by about that much, with glibc's default (the control) it does not,
because glibc's threshold rose past 1 MiB when the first large block was freed.

Kept memory: the trainer's worker thread allocates 32 MiB of 1 MiB tensors and frees them,
eight times, as a micro-batch does each step. With glibc's defaults (the control) every step
faults its pages in again (glibc trims the thread's heap when they are freed); with
`keep_freed_memory`, once the heap has settled (a few steps), none do.
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


KEEP_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from sft_torch import micro_batch_threads, runtime
    if sys.argv[1] == "keep":
        assert runtime.keep_freed_memory()
    def step():
        xs = [torch.ones(1 << 18) for _ in range(32)]  # 32 x 1 MiB, freed at the end
        del xs
    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        micro_batch_threads.workers(1).submit(step).result()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(*[faults() for _ in range(8)])
    """
)


def step_faults(mode: str) -> list[int]:
    """Minor page faults of each of 8 steps on the trainer's worker thread."""
    out = subprocess.run(
        [sys.executable, "-c", KEEP_SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return [int(n) for n in out.stdout.split()]


def test_kept_memory_is_reused_without_page_faults():
    pages = 32 * 2**20 // 4096
    keep = step_faults("keep")
    assert keep[0] > pages / 2  # the first step maps its memory
    assert max(keep[-3:]) < pages / 20  # once the heap has settled, steps reuse it
    default = step_faults("default")  # control: glibc trims the heap, every step faults again
    assert min(default[-3:]) > pages / 2


def test_malloc_tuned_in_the_environment_is_left_alone(monkeypatch):
    from sft_torch import runtime

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # not a parameter keep_freed_memory sets
    assert not runtime.malloc_tuned_by_environment()
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")
    assert runtime.malloc_tuned_by_environment()
    assert not runtime.keep_freed_memory()  # returns before touching anything
    monkeypatch.delenv("MALLOC_TOP_PAD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert runtime.malloc_tuned_by_environment()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=2048")
    assert not runtime.malloc_tuned_by_environment()


def test_the_trainer_keeps_memory_on_cpu_unless_told_to_release_it(tmp_path, tiny_llama):
    from sft_torch.train import Trainer

    from tests.backends.torch.conftest import events_for, make_plan

    for release, keep in ((False, True), (True, False)):
        plan = make_plan(
            tmp_path / str(release), tiny_llama, torch_opts={"release_memory": release}
        )
        trainer = Trainer(plan, events_for(plan))
        assert trainer.levers.keep_memory is keep and trainer.levers.release_memory is release
        assert trainer.loss_settings.reuse_logits is keep
