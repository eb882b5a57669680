"""`torch.micro_batch_threads`: a step's micro-batches on concurrent threads (CPU).

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_micro_batch_threads.py

Concurrent micro-batches must train what one-after-the-other training trains (the same
losses and weights up to fp32 rounding without dropout), be reproducible whatever the threads'
timing (bitwise, with dropout), resume exactly, and be used only where nothing else draws
random numbers: `auto` falls back to 1, an explicit request that cannot be honoured is an error.
"""

from __future__ import annotations

import pytest
import torch
from sft.errors import SftError
from sft.events import read_metrics
from sft_torch.train import Trainer, fit

from tests.backends.torch.conftest import events_for, make_plan

pytestmark = pytest.mark.torch

TRAIN = {
    "max_steps": 4,
    "learning_rate": 5e-3,
    "micro_batch_size": 1,
    "gradient_accumulation_steps": 4,
}


def run(plan):
    trainer = Trainer(plan, events_for(plan))
    fit(trainer)
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    losses = {r["step"]: r["loss"] for r in read_metrics(plan.run_dir) if "loss" in r}
    return trainer, weights, losses


def plan_for(tmp_path, model, threads, dropout=0.0, **kw):
    return make_plan(
        tmp_path,
        model,
        method=kw.pop("method", {"name": "lora", "r": 4, "dropout": dropout}),
        train={**TRAIN, **kw.pop("train", {})},
        torch_opts={"micro_batch_threads": threads, **kw.pop("torch_opts", {})},
        **kw,
    )


def test_threads_train_what_sequential_training_trains(tmp_path, tiny_llama):
    seq, w_seq, l_seq = run(plan_for(tmp_path / "a", tiny_llama, 1))
    par, w_par, l_par = run(plan_for(tmp_path / "b", tiny_llama, 3))
    assert seq.micro_batch_threads == 1 and par.micro_batch_threads == 3
    assert sorted(l_par) == [1, 2, 3, 4]
    for s in l_seq:
        assert l_par[s] == pytest.approx(l_seq[s], rel=1e-5)
    changed = 0
    for n in w_seq:
        torch.testing.assert_close(w_par[n], w_seq[n], rtol=1e-4, atol=1e-6)
        changed += "lora_B" in n and bool(w_par[n].abs().sum() > 0)
    assert changed  # the adapters did train


def test_threads_are_reproducible_and_resume_exactly(tmp_path, tiny_llama):
    ck = {"every_steps": 2, "keep_last": 10}
    kw = {"dropout": 0.3, "checkpoint": ck, "packing": True}
    _, w1, l1 = run(plan_for(tmp_path / "a", tiny_llama, 2, **kw))
    _, w2, l2 = run(plan_for(tmp_path / "b", tiny_llama, 2, **kw))
    assert l1 == l2 and all(torch.equal(w1[n], w2[n]) for n in w1)
    _, _, l_seq = run(plan_for(tmp_path / "c", tiny_llama, 1, **kw))
    # dropout masks really come from the per-micro-batch generators (step 1: B is still 0)
    assert l_seq[3] != l1[3]

    from sft.checkpoints import complete_checkpoints

    mid = complete_checkpoints(tmp_path / "a" / "run")[0]
    _, w3, l3 = run(plan_for(tmp_path / "d", tiny_llama, 2, resume_from=mid, **kw))
    assert sorted(l3) == [3, 4] and all(l3[s] == l1[s] for s in l3)
    assert all(torch.equal(w1[n], w3[n]) for n in w1)


def test_auto_and_what_blocks_it(tmp_path, tiny_llama):
    def threads(path, opt, **kw):
        plan = plan_for(tmp_path / path, tiny_llama, opt, **kw)
        return Trainer(plan, events_for(plan)).micro_batch_threads

    two = {"num_threads": 2}
    assert threads("a", None) == 1  # one torch thread (the tests' default)
    assert threads("b", None, torch_opts=two, dropout=0.1) == 2
    assert threads("c", None, torch_opts=two, train={"gradient_accumulation_steps": 1}) == 1
    gc = {"gradient_checkpointing": True}
    assert threads("d", None, torch_opts=two, train=gc) == 1
    # full fine-tuning: a second thread would hold a second full-size set of gradients
    assert threads("full", None, torch_opts=two, method={"name": "full"}) == 1
    assert threads("full2", 2, torch_opts=two, method={"name": "full"}) == 2  # asked for
    slow = {**two, "fast_dropout": False}
    assert threads("e", None, torch_opts=slow, dropout=0.1) == 1  # torch's nn.Dropout
    assert threads("f", 2, torch_opts=slow, dropout=0.0) == 2  # no dropout at all
    with pytest.raises(SftError, match="gradient checkpointing"):
        threads("g", 2, train=gc)
    with pytest.raises(SftError, match="own dropout in"):
        threads("h", 2, torch_opts=slow, dropout=0.1)


def test_every_step_runs_on_the_same_worker_threads():
    """The workers live as long as the process: new threads each step got new malloc arenas
    while the last step's were exiting, and the memory those arenas kept piled up."""
    import contextlib
    import threading

    from sft_torch import micro_batch_threads

    weight = torch.nn.Parameter(torch.ones(3))
    seen: list[set[int]] = []

    def forward(rows, w):
        seen[-1].add(threading.get_native_id())  # a new thread gets a new one
        loss = (weight * rows).sum() * w
        return loss, loss, 3

    batches = [(torch.full((3,), float(i)), 1.0) for i in range(4)]
    for _ in range(3):
        seen.append(set())
        micro_batch_threads.run(2, batches, forward, [weight], contextlib.nullcontext)
    assert len(set().union(*seen)) <= 2 and threading.get_native_id() not in seen[0]
    assert torch.equal(weight.grad, torch.full((3,), 3 * 6.0))  # 3 steps of 0+1+2+3 per element


def test_gradients_are_summed_in_micro_batch_order_whatever_finishes_first():
    """Each gradient goes into .grad as soon as it exists (no thread holds a full set), yet in
    micro-batch order: with the later micro-batches finishing first, .grad is still
    ((g0 + g1) + g2) + g3 bitwise, as one after the other gives (float sums depend on order)."""
    import contextlib
    import time

    from sft_torch import micro_batch_threads

    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(4096, generator=gen) * 10 ** (6 * torch.rand(4096, generator=gen) - 3)]
    rows += [torch.randn(4096, generator=gen) * 10 ** (6 * torch.rand(4096, generator=gen) - 3)]
    rows += [-rows[0] * 0.999, rows[1] * 1e-3]
    expected = ((rows[0] + rows[1]) + rows[2]) + rows[3]
    assert not torch.equal(expected, ((rows[2] + rows[1]) + rows[0]) + rows[3])  # order shows
    weight = torch.nn.Parameter(torch.zeros(4096))
    unused = torch.nn.Parameter(torch.zeros(3))  # no micro-batch reaches it: no gradient

    def forward(r, w):
        time.sleep(0.3 if r is rows[0] else 0.15 if r is rows[1] else 0.0)  # 2, 1, 0 finish first
        loss = (weight * r).sum() * w
        return loss, loss, 1

    batches = [(r, 1.0) for r in rows]
    micro_batch_threads.run(3, batches, forward, [weight, unused], contextlib.nullcontext)
    assert torch.equal(weight.grad, expected) and unused.grad is None
    assert not weight._backward_hooks  # the hooks go with the step

    def failing(r, w):
        if r is rows[1]:
            raise RuntimeError("boom in micro-batch 1")
        return forward(r, w)

    weight.grad = None
    with pytest.raises(RuntimeError, match="boom"):
        micro_batch_threads.run(3, batches, failing, [weight], contextlib.nullcontext)
    # the others were not left waiting for its turn: all three workers are free again
    import threading

    barrier = threading.Barrier(3, timeout=10)
    pool = micro_batch_threads.workers(3)
    assert all(f.result() is not None for f in [pool.submit(barrier.wait) for _ in range(3)])
