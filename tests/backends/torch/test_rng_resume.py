"""A checkpoint's CUDA RNG state is this process's device only (issue #20, item 6).

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_rng_resume.py

Each rank draws its dropout masks from its own GPU's generator. Saving every visible GPU's
state (`get_rng_state_all`) and restoring them all (`set_rng_state_all`) fails as soon as the
resume sees fewer GPUs than the save (a rank-1 checkpoint of an 8-GPU job resumed on a 2-GPU
host, or CUDA_VISIBLE_DEVICES set per rank), and on the way overwrote the generators of GPUs
other ranks own. No GPU here: `torch.cuda` is replaced by a small stand-in with torch's
semantics for the RNG calls (per-device states, an error for a device that does not exist), so
the test checks the decision of which generator is saved and restored.
"""

from __future__ import annotations

import pytest
import torch
from sft_torch import runtime

pytestmark = pytest.mark.torch


class FakeCuda:
    """`count` GPUs, this process on `current`; the RNG calls behave as torch.cuda's."""

    def __init__(self, count: int, current: int) -> None:
        self.count, self.current = count, current
        self.states = {i: torch.tensor([i, 7], dtype=torch.uint8) for i in range(count)}

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.count

    def current_device(self) -> int:
        return self.current

    def _check(self, device: int) -> int:
        device = self.current if device in (None, "cuda") else int(device)
        if not 0 <= device < self.count:
            raise RuntimeError(f"CUDA error: invalid device ordinal {device}")
        return device

    def get_rng_state(self, device: int | None = None) -> torch.Tensor:
        return self.states[self._check(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device: int | None = None) -> None:
        self.states[self._check(device)] = state.clone()

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [self.get_rng_state(i) for i in range(self.count)]

    def set_rng_state_all(self, states: list[torch.Tensor]) -> None:
        for i, state in enumerate(states):
            self.set_rng_state(state, i)


def test_rank_of_a_bigger_host_resumes_on_one_gpu(monkeypatch):
    saver = FakeCuda(count=2, current=1)  # rank 1 of a 2-GPU job
    monkeypatch.setattr(torch, "cuda", saver)
    state = runtime.rng_state()
    assert torch.equal(state["cuda"], saver.states[1])  # its own device, not every GPU

    resumer = FakeCuda(count=1, current=0)  # resumed where the process sees one GPU
    monkeypatch.setattr(torch, "cuda", resumer)
    runtime.set_rng_state(state)
    assert torch.equal(resumer.states[0], saver.states[1])


def test_restoring_leaves_the_other_gpus_alone(monkeypatch):
    cuda = FakeCuda(count=2, current=0)
    monkeypatch.setattr(torch, "cuda", cuda)
    state = runtime.rng_state()
    other = cuda.states[1].clone()
    cuda.states[1] = torch.tensor([9, 9], dtype=torch.uint8)  # rank 1 drew meanwhile
    runtime.set_rng_state(state)
    assert torch.equal(cuda.states[1], torch.tensor([9, 9], dtype=torch.uint8))
    assert not torch.equal(cuda.states[1], other)


def test_a_checkpoint_with_every_gpus_state_still_resumes(monkeypatch):
    """Checkpoints written before this change hold a list (one state per visible GPU)."""
    cuda = FakeCuda(count=1, current=0)
    monkeypatch.setattr(torch, "cuda", cuda)
    state = runtime.rng_state()
    state["cuda"] = [
        torch.tensor([5, 5], dtype=torch.uint8),
        torch.tensor([6, 6], dtype=torch.uint8),
    ]
    runtime.set_rng_state(state)
    assert torch.equal(cuda.states[0], torch.tensor([5, 5], dtype=torch.uint8))
