"""`sft bench`: a short real training run through the torch backend's own loop, measured.

    $ sft bench --config configs/smollm2-135m/lora.yaml --steps 20 --json bench.json
    $ sft bench --config FILE data.packing=false torch.chunked_loss=false   # a lever switched off

It runs `sft_torch.train.train` (the loop `sft run` uses, not a copy) for `--steps` optimizer
steps in a temporary run directory and reports:

- trained tokens/s (tokens that carry a label) and processed tokens/s (every non-padding token
  fed through the model), both over the steady state: the steps after the first one;
- the padding fraction (padding slots / all slots of the padded micro-batches);
- time to first step (from the start of the command: data preparation, model load, first step);
- peak memory: the process's resident-set high-water mark on CPU (`ru_maxrss`, the peak over
  the whole run), the device's peak allocation on GPU;
- per measured step, the process's minor page faults and system CPU seconds (`getrusage`):
  memory the allocator returned to the OS and mapped again costs a fault and a zeroed page
  per 4 KiB (`torch.release_memory`, docs/performance.md "Kept memory");
- achieved FLOP/s and its fraction of the machine's GEMM rate in the precision the run computes
  in (bf16, fp16, tf32 or fp32), measured by a matmul probe in the same process before and after
  training (the best rate counts): on CPU squares sized to the time budget, on a GPU a sustained
  8192-square GEMM (a small one is launch- and sync-bound and would understate the peak);
- on a GPU listed in `PEAK_TFLOPS`, MFU: achieved FLOP/s over the datasheet's dense peak for
  that precision (`mfu`, None for GPUs not in the table).

Useful FLOPs (recomputation from gradient checkpointing and padding are not counted):

    per non-padding token:  sum over body Linear layers of  m x (weights)
                            m = 6 if the layer trains, 4 if frozen but gradients flow through
                            it (LoRA base, layers above the lowest trainable one), 2 otherwise
    per trained token:      m x (output head weights)   (logits are needed only where trained)
    per sample of length s: a x 2 x layers x d_attn x s(s+1)   (causal QK^T and AV; a = 3 when
                            gradients flow through attention, 1 when it is frozen below them)

so full fine-tuning is about 6N per token and LoRA about 4N plus 6 x adapter size, as usual.
"""

from __future__ import annotations

import itertools
import json
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Annotated, Any, Optional

import sft
import typer
from sft.errors import SftError
from sft.events import RunEvents

GEMM_SIZE = 1024
#: square size of the GPU probe: large enough to run at the sustained tensor-core rate
GPU_GEMM_SIZE = 8192

#: Dense (no 2:4 sparsity) peak TFLOP/s per precision from NVIDIA's datasheets, keyed by a
#: fragment of `torch.cuda.get_device_name()`; the longest matching key wins ("A10G" before
#: "A10", "H100 PCIe" before "H100"). A precision the GPU has no tensor-core path for is
#: absent (T4 / V100: no bf16, no tf32).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 80.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "T4": {"fp16": 65.0, "fp32": 8.1},
    "V100-PCIE": {"fp16": 112.0, "fp32": 14.0},
    "V100": {"fp16": 125.0, "fp32": 15.7},  # SXM2
}


def peak_flops(device_name: str, key: str) -> float | None:
    """Datasheet dense peak FLOP/s of the GPU called `device_name` in `key` (bf16, fp16, tf32,
    fp32), or None when the GPU is not in `PEAK_TFLOPS` or has no such rate."""
    name = device_name.upper()
    hits = [k for k in PEAK_TFLOPS if k.upper() in name]
    if not hits:
        return None
    tflops = PEAK_TFLOPS[max(hits, key=len)].get(key)
    return None if tflops is None else tflops * 1e12


def compute_key(precision: str, device_type: str, tf32: bool | None = None) -> str:
    """The GEMM rate a run's matmuls get: its autocast dtype, or for fp32 on CUDA tf32 when
    torch lets fp32 matmuls use tensor cores (`torch.backends.cuda.matmul.allow_tf32`)."""
    if precision != "fp32":
        return precision
    if device_type != "cuda":
        return "fp32"
    if tf32 is None:
        import torch

        tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    return "tf32" if tf32 else "fp32"


# ------------------------------------------------------------------------------ machine rate


def probe_size(dtype: Any, device: Any, seconds: float, largest: int = GEMM_SIZE) -> int:
    """The largest square size (256 .. `largest`, powers of two) whose single matmul fits in
    `seconds`, estimated from one 256-square product. Why: on a CPU without native bf16 (AVX2
    only) a 1024-square bf16 matmul takes seconds, so a fixed-size probe would cost more than
    the run it measures; 256 is still large enough to reach the emulated kernel's rate."""
    import torch

    size = 256
    a = torch.randn(size, size, device=device).to(dtype)
    (a @ a).sum().item()  # warm-up: thread pool, kernel selection
    t0 = time.perf_counter()
    (a @ a).sum().item()
    per_flop = (time.perf_counter() - t0) / (2.0 * size**3)
    while size < largest and per_flop * 2.0 * (2 * size) ** 3 <= seconds:
        size *= 2
    return size


def gemm_rate(dtype: Any, device: Any, size: int | None = None, seconds: float = 0.3) -> float:
    """Best FLOP/s of `size`-square matmuls in `dtype` over three timed bursts of ~`seconds`.
    Best-of, not mean: other processes on a shared machine only ever make it slower. `size`
    None: the largest that fits the time budget (`probe_size`)."""
    import torch

    size = size or probe_size(dtype, device, seconds)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    flops = 2.0 * size**3
    (a @ b).sum().item()  # warm-up: thread pool, kernel selection
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while True:
            c = a @ b
            n += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
        del c
        best = max(best, n * flops / elapsed)
    return best


def gemm_probe(device: Any, key: str = "bf16", seconds: float = 0.3) -> dict[str, float]:
    """FLOP/s of this machine now: {"fp32": ..., key: ...} (`key` the run's compute, see
    `compute_key`; on CPU always fp32 and bf16). On a GPU each rate is a sustained
    `GPU_GEMM_SIZE`-square GEMM; tf32 is fp32 with tensor cores allowed."""
    import torch

    dtypes = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
    dtypes["fp16"] = torch.float16
    keys = ["fp32", key] if device.type == "cuda" else ["fp32", "bf16"]
    out: dict[str, float] = {}
    for k in dict.fromkeys(keys):
        if device.type != "cuda":
            out[k] = gemm_rate(dtypes[k], device, seconds=seconds)
            continue
        matmul = torch.backends.cuda.matmul
        saved = matmul.allow_tf32
        matmul.allow_tf32 = k == "tf32"
        try:
            out[k] = gemm_rate(dtypes[k], device, size=GPU_GEMM_SIZE, seconds=seconds)
        finally:
            matmul.allow_tf32 = saved
    return out


def cpu_features() -> list[str]:
    """The bf16-relevant instruction sets this CPU reports (avx512_bf16, amx_bf16, ...)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return []
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    return [w for w in wanted if w in flags]


# ------------------------------------------------------------------------------ FLOP model


@dataclass
class FlopModel:
    """Coefficients of the FLOP count in the module docstring."""

    per_token: float
    """FLOPs per non-padding token through the body (all Linear layers but the head)."""
    per_trained_token: float
    """FLOPs per trained token through the output head."""
    per_attn_unit: float
    """FLOPs per unit of sum over samples of s(s+1)."""
    params: int
    trainable_params: int

    def step_flops(self, tokens: int, trained: int, attn_units: int) -> float:
        return (
            self.per_token * tokens
            + self.per_trained_token * trained
            + self.per_attn_unit * attn_units
        )


def meta_model(plan: Any) -> Any:
    """The configured model with its method applied, built on the meta device (no memory, no
    weights read): just enough to count what trains and what only passes gradients."""
    import torch
    from sft.specs import LoraMethod
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft_torch.methods import apply_method

    cfg = AutoConfig.from_pretrained(
        str(plan.model.path), trust_remote_code=plan.config.model.trust_remote_code
    )
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(
            cfg, trust_remote_code=plan.config.model.trust_remote_code
        )
    method = plan.config.method
    if method.name == "qlora":  # same adapters; the 4-bit base costs the same matmul FLOPs
        method = LoraMethod(**method.model_dump(include=set(LoraMethod.model_fields) - {"name"}))
    return apply_method(lm, method)


def flop_model(plan: Any) -> FlopModel:
    """Count FLOP coefficients from the real module tree (see the module docstring)."""
    from torch import nn

    from sft_torch.methods import count_params
    from sft_torch.model import causal_lm

    model = meta_model(plan)
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    modules = list(model.named_modules())
    first_trainable = next(
        (
            i
            for i, (_, m) in enumerate(modules)
            if any(p.requires_grad for p in m.parameters(recurse=False))
        ),
        len(modules),
    )
    body = head_cost = 0.0
    flowing = frozen_below = 0
    for i, (_, mod) in enumerate(modules):
        if not isinstance(mod, nn.Linear):
            continue
        w = sum(p.numel() for p in mod.parameters(recurse=False))
        trains = any(p.requires_grad for p in mod.parameters(recurse=False))
        grads_flow = i >= first_trainable
        mult = 6 if trains else (4 if grads_flow else 2)
        if mod is head:
            head_cost = mult * w
            continue
        body += mult * w
        flowing, frozen_below = flowing + w * grads_flow, frozen_below + w * (not grads_flow)
    cfg = lm.config
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    attn_mult = 1 + 2 * flowing / max(flowing + frozen_below, 1)
    total, trainable = count_params(model)
    return FlopModel(
        per_token=body,
        per_trained_token=head_cost,
        per_attn_unit=attn_mult * 2 * layers * heads * head_dim,
        params=total,
        trainable_params=trainable,
    )


# ------------------------------------------------------------------------------ token counts


@dataclass
class StepWork:
    """What one optimizer step feeds the model, replayed from the loop's own schedule."""

    trained: int
    tokens: int
    """Non-padding tokens."""
    slots: int
    """Positions of the padded micro-batches (tokens + padding)."""
    attn_units: int
    """Sum over samples of s(s+1), for the attention FLOPs."""


def step_work(plan: Any, steps: int) -> list[StepWork]:
    """Per-step token counts of the first `steps` steps, from `sft.data.schedule.Schedule` (the
    object the loop iterates), so they describe exactly the batches it trains on."""
    from sft.data.batching import count_trained
    from sft.data.schedule import Position, Schedule

    sched = Schedule.build(plan, rank=0, world=1)
    lengths = [int(n) for n in sched.split.lengths]
    out: list[StepWork] = []
    for _, rows in sched.steps(Position()):
        if len(out) == steps:
            break
        tokens = slots = attn = 0
        for mb in sched.micro_batches(rows):
            row_lens = [sum(lengths[i] for i in row) for row in mb]
            tokens += sum(row_lens)
            slots += len(mb) * max(row_lens)  # collate pads each micro-batch to its longest row
            attn += sum(lengths[i] * (lengths[i] + 1) for row in mb for i in row)
        out.append(StepWork(count_trained(sched.split, rows), tokens, slots, attn))
    return out


class TimedEvents(RunEvents):
    """RunEvents that also note when each training step was logged (perf_counter) and what the
    loop said at train start; the bench forces `logging.every_steps=1`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_times: list[float] = []
        self.step_usage: list[tuple[int, float]] = []
        """(minor page faults, system CPU seconds) of the process so far, at each step."""
        self.losses: list[float] = []
        self.info: dict[str, Any] = {}
        self.loop_counts: list[tuple[int, int]] = []
        """(trained, non-padding) tokens so far, as the loop itself counted them."""

    def train_start(self, info: dict[str, Any]) -> None:
        self.info = dict(info)
        super().train_start(info)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if "loss" in metrics and "eval_loss" not in metrics:
            self.step_times.append(time.perf_counter())
            usage = resource.getrusage(resource.RUSAGE_SELF)
            self.step_usage.append((usage.ru_minflt, usage.ru_stime))
            self.losses.append(float(metrics["loss"]))
            self.loop_counts.append(
                (int(metrics.get("trained_tokens", -1)), int(metrics.get("tokens", -1)))
            )
        super().log(step, metrics)


# ------------------------------------------------------------------------------ the run


def forced_overrides(steps: int, run_dir: Path) -> list[str]:
    """What a bench run always overrides: a fixed number of steps, a log line per step (the
    timing points), no eval, checkpoints, exports, plots or progress bar in the measurement."""
    return [
        f"train.max_steps={steps}",
        "logging.every_steps=1",
        "logging.progress=false",
        "logging.plot=false",
        "logging.tensorboard=false",
        "eval.every_steps=null",
        "checkpoint.every_steps=null",
        "checkpoint.resume=null",
        "export.formats=[]",
        "data.eval_fraction=0",
        f"output_dir={run_dir}",
    ]


def peak_memory(device: Any) -> dict[str, float]:
    import torch

    # ru_maxrss is in KiB on Linux: the high-water mark of this process since it started
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_device_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


@dataclass
class Setup:
    """The run's settings that matter for speed, resolved as the loop will resolve them."""

    device: Any
    threads: int
    precision: str
    levers: dict[str, Any] = field(default_factory=dict)
    """`sft_torch.levers.resolve_levers` before the model is loaded; the report shows them as
    the loop reported them at train start (`Trainer.info`)."""
    device_name: str = ""
    """torch.cuda.get_device_name() on a GPU, for the peak table; "" on CPU."""
    compute: str = ""
    """The GEMM rate the run's matmuls get (`compute_key`): bf16, fp16, tf32 or fp32."""


def setup(plan: Any) -> Setup:
    """Resolve device, precision and levers exactly as the loop will (`sft_torch.runtime`,
    `sft_torch.levers`), and use the loop's threads for the GEMM probe."""
    import torch

    from sft_torch import runtime
    from sft_torch.levers import resolve_levers
    from sft_torch.options import torch_options

    cfg = plan.config
    device = runtime.resolve_device(torch_options(plan).device)
    precision = runtime.resolve_precision(cfg.train.precision, device, cfg.model.dtype)
    levers = resolve_levers(plan, device, precision, cfg.parallel.world_size)
    torch.set_num_threads(levers.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return Setup(
        device,
        levers.threads,
        precision,
        {k: v for k, v in levers.report().items() if k != "threads"},
        name,
        compute_key(precision, device.type),
    )


def run_bench(
    config_path: Path, steps: int, overrides: list[str] | None = None, probe_seconds: float = 0.3
) -> dict[str, Any]:
    """Prepare, probe, train `steps` steps through the real loop, and measure (see module doc)."""
    from sft_torch.imports import import_train

    import_train("lora")  # as `sft run` imports (peft too: harmless for other methods)
    import torch
    from sft.config import load_config
    from sft.plugins import get_plugins
    from sft.run import build_plan

    if steps < 2:
        raise SftError("--steps must be at least 2: the first step (warm-up) is timed apart")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sft-bench-") as tmp:
        cfg = load_config(
            config_path, [*(overrides or []), *forced_overrides(steps, Path(tmp))], backend="torch"
        )
        plugins = get_plugins()
        plan, backend = build_plan(cfg, plugins)
        prepared = time.perf_counter()
        st = setup(plan)
        if st.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(st.device)
        rates = gemm_probe(st.device, st.compute, probe_seconds)
        work = step_work(plan, steps)
        flops = flop_model(plan)
        events = TimedEvents(cfg, plan.run_dir, plugins.hook)
        t_train = time.perf_counter()
        backend.train(plan, events)
        after = gemm_probe(st.device, st.compute, probe_seconds)
        rates = {k: max(v, after[k]) for k, v in rates.items()}
        probe_s = t_train - prepared  # probe + meta model + replay, not part of any timing
        return report(
            cfg,
            st,
            work,
            flops,
            events,
            rates,
            peak_memory(st.device),
            setup_s=prepared - t0,
            first_step_s=events.step_times[0] - t_train,
            probe_s=probe_s,
            config_path=config_path,
        )


def check_replay(work: list[StepWork], events: TimedEvents) -> None:
    """The replayed schedule must count the same tokens the loop counted while training; a
    mismatch means the bench would report numbers for batches that were not trained on."""
    trained = tokens = 0
    for i, (w, (lt, ln)) in enumerate(zip(work, events.loop_counts, strict=True)):
        trained, tokens = trained + w.trained, tokens + w.tokens
        if lt >= 0 and (lt, ln) != (trained, tokens):
            raise RuntimeError(
                f"bench replay disagrees with the loop at step {i + 1}: "
                f"{(trained, tokens)} vs {(lt, ln)} (trained, tokens)"
            )


def report(
    cfg: Any,
    st: Setup,
    work: list[StepWork],
    flops: FlopModel,
    events: TimedEvents,
    rates: dict[str, float],
    memory: dict[str, float],
    *,
    setup_s: float,
    first_step_s: float,
    probe_s: float,
    config_path: Path,
) -> dict[str, Any]:
    """The numbers of one bench run (steady state = every step after the first)."""
    times = events.step_times
    if len(times) != len(work):
        raise SftError(f"bench: the loop logged {len(times)} steps, expected {len(work)}")
    check_replay(work, events)
    steady, seconds = work[1:], times[-1] - times[0]
    trained, tokens = sum(w.trained for w in steady), sum(w.tokens for w in steady)
    slots = sum(w.slots for w in work)
    achieved = sum(flops.step_flops(w.tokens, w.trained, w.attn_units) for w in steady) / seconds
    probe = rates[st.compute or ("bf16" if st.precision == "bf16" else "fp32")]
    peak = peak_flops(st.device_name, st.compute) if st.device_name else None
    return {
        "config": str(config_path),
        "model": cfg.model.name_or_path,
        "method": cfg.method.name,
        "device": str(st.device),
        "precision": st.precision,
        "threads": st.threads,
        "cpu_features": cpu_features() if st.device.type == "cpu" else [],
        # as the loop applied them (`auto` resolved for the loaded model: packed attention,
        # attention kernel, micro-batch threads ...)
        "levers": {k: events.info.get(k, v) for k, v in st.levers.items()},
        "steps": len(work),
        "measured_steps": len(steady),
        "trained_tokens_per_s": trained / seconds,
        "processed_tokens_per_s": tokens / seconds,
        "padding_fraction": 1 - sum(w.tokens for w in work) / max(slots, 1),
        "time_to_first_step_s": setup_s + first_step_s,
        "setup_s": setup_s,
        "first_step_s": first_step_s,
        "probe_s": probe_s,
        "steady_s": seconds,
        **memory,
        "params": flops.params,
        "trainable_params": flops.trainable_params,
        "flops_per_token": flops.per_token + flops.per_trained_token,
        "achieved_flops": achieved,
        "gemm_flops": rates,
        "compute": st.compute,
        "gemm_fraction": achieved / probe,
        "device_name": st.device_name,
        "peak_flops": peak,
        "mfu": achieved / peak if peak else None,
        "step_seconds": [b - a for a, b in itertools.pairwise(times)],
        "step_minor_faults": [b[0] - a[0] for a, b in itertools.pairwise(events.step_usage)],
        "step_system_s": [b[1] - a[1] for a, b in itertools.pairwise(events.step_usage)],
        "losses": events.losses,
        "trained_tokens": [w.trained for w in work],
        "tokens": [w.tokens for w in work],
    }


def format_report(r: dict[str, Any]) -> str:
    """The human-readable summary printed by `sft bench`."""
    mem = f"{r['peak_rss_mib']:.0f} MiB RSS"
    if "peak_device_mib" in r:
        mem += f", {r['peak_device_mib']:.0f} MiB on {r['device']}"
    rates = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in r["gemm_flops"].items())
    on = [k for k, v in r["levers"].items() if v is True]
    if r["levers"].get("packing") and r["levers"].get("packed_attention"):
        on.append(f"packed attention: {r['levers']['packed_attention']}")
    if (r["levers"].get("micro_batch_threads") or 1) > 1:
        on.append(f"micro-batch threads: {r['levers']['micro_batch_threads']}")
    rows = [
        (
            "model",
            f"{r['model']} ({r['method']}, {r['params'] / 1e6:.1f}M params, "
            f"{r['trainable_params'] / 1e6:.2f}M trainable)",
        ),
        (
            "device",
            f"{r['device']}, {r['precision']}, {r['threads']} threads "
            f"{' '.join(r['cpu_features'])}".rstrip(),
        ),
        ("levers on", ", ".join(on) or "-"),
        ("steps", f"{r['steps']} ({r['measured_steps']} measured after the first)"),
        ("trained tokens/s", f"{r['trained_tokens_per_s']:.1f}"),
        ("processed tokens/s", f"{r['processed_tokens_per_s']:.1f}"),
        ("padding", f"{100 * r['padding_fraction']:.1f}%"),
        ("time to first step", f"{r['time_to_first_step_s']:.1f} s (setup {r['setup_s']:.1f} s)"),
        ("peak memory", mem),
        (
            "page faults",
            f"{median(r['step_minor_faults']):.0f} minor faults, "
            f"{median(r['step_system_s']):.2f} s system CPU per measured step (median)",
        ),
        (
            "achieved",
            f"{r['achieved_flops'] / 1e9:.1f} GFLOP/s = "
            f"{100 * r['gemm_fraction']:.0f}% of the {r['compute']} GEMM probe",
        ),
        ("GEMM probe", f"{rates} GFLOP/s ({probe_shape(r)})"),
    ]
    if r.get("mfu") is not None:
        rows.append(
            (
                "MFU",
                f"{100 * r['mfu']:.1f}% of the {r['device_name']} {r['compute']} dense peak "
                f"({r['peak_flops'] / 1e12:.0f} TFLOP/s)",
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def probe_shape(r: dict[str, Any]) -> str:
    if r["device"].startswith("cuda"):
        return f"sustained {GPU_GEMM_SIZE}-square GEMMs"
    return f"square, up to {GEMM_SIZE}, sized to the budget"


# ------------------------------------------------------------------------------ CLI


def bench(
    config: Annotated[Path, typer.Option("--config", "-c", help="Job spec YAML file.")],
    overrides: Annotated[
        Optional[list[str]],
        typer.Argument(
            help="Overrides as key.sub=value, e.g. data.packing=false torch.chunked_loss=false"
        ),
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps to run (the first is warm-up).")] = 10,
    json_out: Annotated[
        Optional[Path],
        typer.Option("--json", help="Also write the numbers (and per-step losses) here."),
    ] = None,
) -> None:
    """Measure training speed and memory: a short real run through the torch loop."""
    result = run_bench(config, steps, overrides)
    typer.echo(format_report(result))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2))
        typer.echo(f"written: {json_out}")


def register_command(cli: Any) -> None:
    cli.command("bench", context_settings={"allow_interspersed_args": True})(bench)


# specname: plugin.py re-exports this beside commands.py's own `sft_register_commands`
@sft.hookimpl(specname="sft_register_commands")
def sft_register_bench_command(cli: Any) -> None:
    register_command(cli)
