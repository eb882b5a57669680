"""Held-out loss during MindFormers training (issue #21, item 4): `data.eval` with
`eval.every_steps` gives metrics.jsonl eval rows with the torch backend's keys and meaning, at
the same steps, and summary.json's eval fields.

The values are checked against two independent computations on the same weights: the final eval
row against a plain transformers forward of the exported HF model in the torch environment,
and the step-2 eval row against MindFormers' own training-mode loss of the step-2 checkpoint.

    $ SFT_TORCH_PYTHON=.venvs/torch/bin/python .venvs/ms/bin/python -m pytest \\
          tests/backends/mindspore/test_heldout.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("mindspore")

from sft.data.batching import collate
from sft.data.cache import IGNORE_INDEX, TokenizedSplit
from sft.plugins import get_plugins

from tests.backends.mindspore.conftest import make_plan, metrics, synthetic_split, torch_losses

pytestmark = [pytest.mark.mindspore, pytest.mark.slow]

REL = 1e-5  # fp32 forward on both sides; differences seen are ~1e-7


def long_split(n: int, seed: int) -> TokenizedSplit:
    """n samples of 24-30 random tokens; the first two train their last 2 tokens only, the
    others their last two thirds. So the eval batches hold very different token counts, and a
    mean of per-batch means (MindFormers' PerplexityMetric) would differ from torch's token
    mean by far more than the tolerance."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        ids = rng.integers(3, 300, int(rng.integers(24, 31))).tolist()
        cut = len(ids) - 2 if i < 2 else len(ids) // 3
        samples.append((ids, [IGNORE_INDEX] * cut + ids[cut:]))
    return TokenizedSplit.from_samples(samples)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama):
    from sft.events import RunEvents
    from sft_mindspore.train import train

    root = tmp_path_factory.mktemp("heldout")
    plan = make_plan(
        root / "ms",
        tiny_llama,
        "lora",
        split=synthetic_split(n=8),
        train={"max_steps": 4, "precision": "fp32"},
        checkpoint={"every_steps": 2, "keep_last": 4},
    )
    # 5 eval samples of up to 30 tokens (longer than any training sample): a partial last batch
    # and a seq_length set by the eval data
    plan.data.eval = long_split(n=5, seed=7)
    plan.config.eval.every_steps = 2
    plan.config.logging.plot = plan.config.logging.tensorboard = False
    result = train(plan, RunEvents(plan.config, plan.run_dir, get_plugins().hook))
    return plan, result


def eval_batch(plan, seq_length):
    split = plan.data.eval
    rows = [[i] for i in range(len(split))]
    batch = collate(split, rows, pad_id=plan.data.pad_id, pad_to=seq_length + 1)
    return {k: batch[k].astype(np.int32) for k in ("input_ids", "labels")}


def test_eval_rows_like_torch(run):
    plan, result = run
    rows = metrics(plan.run_dir)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert set(r) == {"step", "time", "eval_loss", "eval_ppl", "eval_tokens"}
        assert math.isclose(r["eval_ppl"], math.exp(r["eval_loss"]), rel_tol=1e-9)
    # each eval row right after its step's training row, as the torch backend writes them
    order = [(r["step"], "eval" if "eval_loss" in r else "train") for r in rows]
    assert order == [(1, "train"), (2, "train"), (2, "eval"), (3, "train"), (4, "train"),
                     (4, "eval")]  # fmt: skip
    assert evals[0]["eval_loss"] != evals[1]["eval_loss"]  # training moved the weights
    summary = result.metrics
    assert {k: summary[k] for k in ("eval_loss", "eval_ppl", "eval_tokens")} == {
        k: evals[-1][k] for k in ("eval_loss", "eval_ppl", "eval_tokens")
    }


def test_final_eval_equals_torch_on_exported_weights(run, tmp_path):
    plan, result = run
    final = [r for r in metrics(plan.run_dir) if "eval_loss" in r][-1]
    batch = eval_batch(plan, result.metrics["seq_length"])
    (torch_loss,) = torch_losses([(plan.run_dir / "final" / "model", batch, None)], tmp_path)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    assert final["eval_tokens"] == tokens
    print(f"final eval_loss {final['eval_loss']!r}, torch {torch_loss!r}")
    assert abs(final["eval_loss"] - torch_loss) <= REL * abs(torch_loss), (final, torch_loss)


def test_step2_eval_equals_mindformers_loss_of_its_checkpoint(run, tmp_path):
    from sft_mindspore.launch import loss_of

    plan, result = run
    step2 = next(r for r in metrics(plan.run_dir) if "eval_loss" in r)
    ckpts = plan.run_dir / "mindformers" / "output" / "checkpoint" / "rank_0"
    (ckpt,) = [p for p in ckpts.glob("*.ckpt") if p.name.endswith("_2.ckpt")]
    batch = eval_batch(plan, result.metrics["seq_length"])
    yaml_path = plan.run_dir / "mindformers.yaml"
    loss = loss_of(yaml_path, ckpt, batch, tmp_path)
    print(f"step-2 eval_loss {step2['eval_loss']!r}, MindFormers loss of its checkpoint {loss!r}")
    assert abs(step2["eval_loss"] - loss) <= REL * abs(loss), (step2, loss)
