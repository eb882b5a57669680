"""`make demo`: fine-tune SmolLM2-135M-Instruct on CPU so that it learns a behaviour it does not
have (a new identity, "I am Quill, the assistant of the sft project", and a house answer format),
and show the difference on held-out prompts that are not in the training data.

    $ make demo                                           # builds .venvs/torch, then runs this
    $ .venvs/torch/bin/python examples/demo/demo.py [key=value overrides]
    $ .venvs/torch/bin/python examples/demo/demo.py train.epochs=2   # quicker, weaker

The job spec and data it uses are the shipped ones, in configs/smollm2-135m/ (`demo.yaml`,
`data/quill_*.jsonl`, written by `make_quill_data.py` beside this file).

Steps, each timed: resolve the built-in model (GGUF -> cached safetensors, once) -> eval the
held-out prompts with the base model -> LoRA training (demo.yaml) -> eval again -> export `hf`
(merged, f32, verified against base + adapter) and `gguf` when the sft-gguf plugin is installed
-> before/after table, loss plot, tokens/s and how to chat with the result.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "smollm2-135m"
CONFIG = CONFIGS / "demo.yaml"
EVAL_FILE = CONFIGS / "data" / "quill_eval.jsonl"
RUN_DIR = Path("runs/smollm2-135m-demo")
TIMES: dict[str, float] = {}


@contextmanager
def step(name: str):
    print(f"\n==> {name}", flush=True)
    t0 = time.perf_counter()
    yield
    TIMES[name] = time.perf_counter() - t0
    print(f"    ({TIMES[name]:.0f} s)", flush=True)


def setup() -> None:
    import torch

    # Every core this machine has (the demo is the only job; SFT_NUM_THREADS overrides it on a
    # shared machine, where idle-spinning extra threads cost more than they give).
    torch.set_num_threads(threads())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # peft asks transformers 5 for a renamed attribute; the deprecation is theirs, not the user's
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")


def threads() -> int:
    return int(os.environ.get("SFT_NUM_THREADS") or os.cpu_count() or 1)


def train(overrides: list[str]) -> dict[str, Any]:
    from sft.config import load_config
    from sft.run import run

    if RUN_DIR.exists():  # the demo's own output: a rerun starts clean (no appended metrics)
        print(f"    removing the previous demo run {RUN_DIR}")
        shutil.rmtree(RUN_DIR)
    # eval.prompts=null: the demo scores the prompts itself, before and after, with its own
    # report (sft run would score them a second time)
    first = [
        f"output_dir={RUN_DIR.resolve()}",
        f"torch.num_threads={threads()}",
        "eval.prompts=null",
    ]
    config = load_config(CONFIG, [*first, *overrides])
    return run(config)


def export(run_dir: Path) -> dict[str, Any]:
    """hf (merged, f32: held to max |logit diff| < 1e-4) and, if installed, gguf (q8_0)."""
    from sft.export import ExportRequest, run_export
    from sft.plugins import get_plugins

    reports = {}
    # The directory name becomes the GGUF's name: exports/gguf/smollm2-135m-quill-q8_0.gguf
    hf_dir = run_dir / "exports" / "hf" / "smollm2-135m-quill"
    reports["hf"] = hf = run_export("hf", ExportRequest(run_dir=run_dir, out=hf_dir, dtype="f32"))
    if "gguf" in get_plugins().exporters:
        gguf_dir = run_dir / "exports" / "gguf"
        req = ExportRequest(run_dir=Path(hf.path), out=gguf_dir, dtype="q8_0")
        reports["gguf"] = run_export("gguf", req)
    for name, rep in reports.items():
        print(f"    {name}: {rep.path}")
        nums = {k: v for k, v in rep.checks.items() if isinstance(v, (int, float, bool))}
        print(f"      verified: {json.dumps(nums)[:300]}")
    return reports


def report(before: dict[str, Any], after: dict[str, Any], summary: dict[str, Any]) -> None:
    from sft_torch.eval import print_comparison

    print("\n" + "=" * 100)
    print("Held-out prompts (paraphrases NOT in the training data), greedy decoding:\n")
    print_comparison(before, after)
    m = summary.get("metrics", {})
    print(
        f"\ntraining: {summary['steps']} steps, final loss {summary['final_loss']:.3f}, "
        f"{m.get('tokens_per_s', 0):.0f} tokens/s "
        f"({m.get('trained_tokens_per_s', 0):.0f} trained tokens/s), "
        f"{m.get('elapsed_s', m.get('train_seconds', 0)) or 0:.0f} s"
    )
    plot = summary.get("outputs", {}).get("loss_plot") or RUN_DIR / "loss.png"
    print(f"loss plot: {plot}")
    print(
        "time per step: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in TIMES.items())
        + f"; total {sum(TIMES.values()):.0f} s"
    )
    print("\nTry it yourself:")
    print(f"  .venvs/torch/bin/sft chat {RUN_DIR}")
    print(f"  .venvs/torch/bin/sft generate {RUN_DIR} --prompt 'Who are you?'")
    print(
        f"  .venvs/torch/bin/sft eval --model {RUN_DIR} --data {EVAL_FILE.relative_to(Path.cwd())}"
        " --compare smollm2-135m-instruct"
    )


def main(argv: list[str]) -> int:
    from sft.errors import SftError
    from sft.models import resolve_model
    from sft_torch.eval import evaluate

    setup()
    try:
        with step("resolve smollm2-135m-instruct (converted from GGUF once, then cached)"):
            print(f"    {resolve_model('smollm2-135m-instruct').path}")
        with step("eval before: the base model on held-out prompts"):
            before = evaluate("smollm2-135m-instruct", EVAL_FILE, max_new_tokens=48)
        with step("train: LoRA on configs/smollm2-135m/data/quill_train.jsonl"):
            summary = train(argv)
        run_dir = Path(summary["run_dir"])
        with step("eval after: the fine-tuned model on the same held-out prompts"):
            after = evaluate(str(run_dir), EVAL_FILE, max_new_tokens=48)
        (run_dir / "eval_before_after.json").write_text(
            json.dumps({"before": before, "after": after}, indent=2)
        )
        with step("export (each export verifies itself)"):
            export(run_dir)
    except SftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    report(before, after, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
