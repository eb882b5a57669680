"""`sft bench`: the speed levers change speed, not the math; the numbers are counted right.

    $ .venvs/torch/bin/python -m pytest tests/backends/torch/test_bench.py

- the packed, chunked-loss run's (per-sample attention, fused loss) per-step losses equal the plain run's (padded rows, full
  logits) within 1e-4, on a tiny llama through the real data pipeline and training loop;
- the bench's replay of the schedule counts the same tokens as the loop (checked inside every
  bench run), packing removes padding, and `sft bench --json` writes what it prints;
- the FLOP model gives 6N per token for full fine-tuning and about 4N plus adapters for LoRA.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from sft.cli import main
from sft.specs import FullMethod, LoraMethod
from sft_torch.bench import flop_model, run_bench

pytestmark = pytest.mark.torch

WORDS = (
    "the quick brown fox jumps over the lazy dog what is the capital of france paris "
    "hello how can i help you today tell me a joke about cats"
).split()


def write_conversations(path: Path, n: int, seed: int = 0) -> Path:
    """`n` multi-turn conversations of varied length (1-3 turns, 2-20 words a message)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            msgs = []
            for _ in range(rng.randint(1, 3)):
                msgs.append(
                    {"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))}
                )
                msgs.append(
                    {
                        "role": "assistant",
                        "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 20))),
                    }
                )
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def write_config(tmp_path: Path, model: Path, n: int = 8, method: str = "full") -> Path:
    """A config whose global batch holds every row, so each step sees the whole data set in
    both the packed and the padded layout and their losses must agree step by step."""
    data = write_conversations(tmp_path / "chats.jsonl", n)
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(
        f"model: {model}\n"
        f"data: {{train: {data}, max_seq_len: 512, shuffle: true}}\n"
        f"method: {method}\n"
        f"train: {{global_batch_size: {n}, micro_batch_size: 2, precision: fp32,\n"
        "        learning_rate: 1.0e-3, warmup_steps: 0, lr_scheduler: constant}\n"
        "torch: {device: cpu, num_threads: 1}\n"
    )
    return cfg


def levers_and_plain(tmp_path: Path, model: Path, method: str, *extra: str) -> tuple[dict, dict]:
    """`sft bench` of one config with the levers of a 2-core CPU run (and `extra` overrides),
    then the same config's plain fp32 run."""
    cfg = write_config(tmp_path, model, method=method)
    fast = run_bench(
        cfg,
        steps=3,
        probe_seconds=0.02,
        overrides=[
            "data.packing=true",
            "torch.chunked_loss=true",
            "torch.loss_chunk_size=16",
            "torch.micro_batch_threads=2",
            *extra,
        ],
    )
    return fast, plain_bench(tmp_path, cfg)


def plain_bench(tmp_path: Path, cfg: Path) -> dict:
    """`sft bench` of `cfg` (fp32) with the data levers and the chunked loss off: padded
    micro-batches, full logits."""
    out = tmp_path / "plain.json"
    code = main(
        [
            "bench",
            "--config",
            str(cfg),
            "--steps",
            "3",
            "--json",
            str(out),
            "data.packing=false",
            "data.group_by_length=false",
            "torch.chunked_loss=false",
        ]
    )
    assert code == 0
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    ["full", "{name: lora, r: 8, dropout: 0.0}"],  # LoRA: fused_lora; no dropout, same math
)
def test_packed_chunked_losses_equal_plain_losses(tmp_path, tiny_llama, method):
    fast, plain = levers_and_plain(tmp_path, tiny_llama, method)

    assert fast["levers"]["packing"] and fast["levers"]["chunked_loss"]
    assert fast["levers"]["fused_loss"] and fast["levers"]["packed_attention"] == "segments"
    assert fast["levers"]["micro_batch_threads"] == 2
    assert fast["levers"]["fused_lora"] is method.startswith("{name: lora")
    assert not plain["levers"]["packing"] and not plain["levers"]["chunked_loss"]
    assert fast["trained_tokens"] == plain["trained_tokens"]  # the same work in every step
    assert fast["losses"] == pytest.approx(plain["losses"], abs=1e-4)
    assert fast["losses"][-1] < fast["losses"][0]  # it trained: the comparison is not vacuous
    # the levers did something: fewer padding slots, fewer rows
    assert fast["padding_fraction"] < plain["padding_fraction"]
    for r in (fast, plain):
        assert (
            r["trained_tokens_per_s"] > 0
            and r["processed_tokens_per_s"] >= r["trained_tokens_per_s"]
        )
        assert r["peak_rss_mib"] > 50 and 0 < r["gemm_fraction"] < 1.5
        assert r["time_to_first_step_s"] >= r["setup_s"] > 0
        assert len(r["step_minor_faults"]) == len(r["step_system_s"]) == r["measured_steps"]
        assert min(r["step_minor_faults"]) >= 0 and min(r["step_system_s"]) >= 0
        assert r["levers"]["keep_memory"] and not r["levers"]["release_memory"]  # CPU default


BF16_LOSS_TOL = 1e-3
"""bf16 with every lever vs the plain fp32 run: each step's loss within this relative
difference (docs/performance.md, "Correctness gates")."""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "{name: lora, r: 8, dropout: 0.0}"])
def test_bf16_levers_losses_track_the_plain_fp32_run(tmp_path, tiny_llama, method):
    """`precision: bf16` (autocast; what `auto` picks on an AVX512-BF16 / AMX CPU) with
    packing, the segments attention, the fused chunked loss, fused LoRA, bf16 frozen weights and
    micro-batch threads: every step's loss within BF16_LOSS_TOL of the plain fp32 run's, and not
    equal to it (so bf16 really ran)."""
    fast, plain = levers_and_plain(tmp_path, tiny_llama, method, "train.precision=bf16")
    assert fast["precision"] == "bf16" and plain["precision"] == "fp32"
    levers = fast["levers"]
    assert levers["fused_loss"] and levers["packed_attention"] == "segments"
    assert levers["micro_batch_threads"] == 2
    lora = method.startswith("{name: lora")
    assert levers["fused_lora"] is lora and levers["bf16_frozen_weights"] is lora
    assert fast["trained_tokens"] == plain["trained_tokens"]
    assert fast["losses"] == pytest.approx(plain["losses"], rel=BF16_LOSS_TOL)
    assert fast["losses"] != pytest.approx(plain["losses"], rel=1e-6)
    assert fast["losses"][-1] < fast["losses"][0]


def meta_plan(model: Path, method) -> SimpleNamespace:
    return SimpleNamespace(
        model=SimpleNamespace(path=model),
        config=SimpleNamespace(model=SimpleNamespace(trust_remote_code=False), method=method),
    )


def test_flop_model_full_and_lora(tiny_llama):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    h, i, v, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], 2
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i  # q, o, k, v, gate, up, down
    body = layers * per_layer

    full = flop_model(meta_plan(tiny_llama, FullMethod()))
    assert full.per_token == 6 * body
    assert full.per_trained_token == 6 * v * h
    assert full.per_attn_unit == 3 * 2 * layers * h  # d_attn = heads x head_dim = hidden

    lora = flop_model(meta_plan(tiny_llama, LoraMethod(r=4)))
    adapters = lora.trainable_params
    assert adapters == 4 * sum(
        layers * (a + b) for a, b in [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    )
    # 4N for the frozen base (forward + input gradients) + 6 x adapters; layer 0's q projection
    # sees only the frozen embedding and needs no input gradient (2N for it)
    assert lora.per_token == pytest.approx(4 * body + 6 * adapters, rel=0.03)
    assert lora.per_trained_token == 4 * v * h


def test_bf16_frozen_weights_change_nothing_but_memory(tmp_path, tiny_llama):
    """Under bf16 autocast the LoRA base kept in bf16 gives the very same losses: autocast would
    have cast each fp32 weight to bf16 for every matmul anyway."""
    cfg = write_config(tmp_path, tiny_llama, method="{name: lora, r: 4, dropout: 0.0}")
    common = [
        "train.precision=bf16",
        "train.learning_rate=1.0e-2",
    ]
    on = run_bench(
        cfg, steps=3, probe_seconds=0.02, overrides=[*common, "torch.bf16_frozen_weights=true"]
    )
    off = run_bench(
        cfg, steps=3, probe_seconds=0.02, overrides=[*common, "torch.bf16_frozen_weights=false"]
    )
    assert on["levers"]["bf16_frozen_weights"] and not off["levers"]["bf16_frozen_weights"]
    assert on["losses"] == off["losses"]
    assert on["losses"][-1] < on["losses"][0]
