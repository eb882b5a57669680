"""Where and how the torch backend computes: device, precision, seeds and RNG state, threads.

device = resolve_device(options.device)                 # torch.device("cpu")
precision = resolve_precision(config.train.precision, device)   # "bf16" on avx512_bf16 CPUs,
                                        # on Ampere+ GPUs; "fp16" (loss scaling) on T4 / V100
with autocast(device, precision): loss = ...
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import warnings
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from sft.errors import SftError

from sft_torch.distributed import local_rank

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: `model.dtype` values that fix the compute precision when `train.precision` is `auto`
WEIGHT_PRECISION = {"bfloat16": "bf16", "float16": "fp16"}


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda if available, else cpu (said once on stderr, with why); an explicit device
    that is missing is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cpu":
            say_cpu_fallback()
    if name == "cuda" and not torch.cuda.is_available():
        raise SftError(
            "torch.device is 'cuda' but torch sees no CUDA GPU "
            f"(torch {torch.__version__}); use torch.device=cpu or auto"
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise SftError("torch.device is 'mps' but MPS is not available; use torch.device=cpu")
    if name == "cuda":
        # this node's GPU for this process: torchrun's LOCAL_RANK (the global rank would pick
        # the wrong one when a node runs fewer processes than it has GPUs)
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device(name)


@lru_cache(maxsize=1)
def say_cpu_fallback() -> str:
    """One stderr line: `torch.device: auto` trains on the CPU, and why (returned for tests)."""
    why = (
        f"this torch build ({torch.__version__}) has no CUDA support"
        if torch.version.cuda is None
        else f"torch (CUDA {torch.version.cuda}) sees no GPU: check the driver and "
        "CUDA_VISIBLE_DEVICES"
    )
    line = f"sft: torch.device auto -> cpu: {why}; set torch.device=cpu to silence this"
    print(line, file=sys.stderr, flush=True)
    return line


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 dot-product instructions (AVX512-BF16 or AMX), where bf16 GEMMs
    are about twice as fast as fp32; elsewhere bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        if "avx512_bf16" in flags or "amx_bf16" in flags:
            return True
    except OSError:
        pass
    cap = torch.backends.cpu.get_cpu_capability()
    return "AMX" in cap.upper()


def physical_cores() -> int:
    """Physical CPU cores (hyper-threads share a core's FPUs, so more GEMM threads than this
    only add contention); os.cpu_count() when psutil is missing or cannot tell."""
    try:
        import psutil  # a dependency of accelerate
    except ImportError:
        return os.cpu_count() or 1
    return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def cuda_has_native_bf16() -> bool:
    """True on GPUs that compute bf16 in hardware (Ampere and newer). Not
    `torch.cuda.is_bf16_supported()`: by default that also counts emulation, which says yes on
    a T4 or V100 where bf16 matmuls run emulated, many times slower than fp16."""
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def resolve_precision(precision: str, device: torch.device, weights: str = "auto") -> str:
    """`auto` -> the dtype of explicit half-precision weights (`model.dtype` bfloat16/float16),
    else bf16 where the device computes it natively, fp16 with loss scaling on CUDA GPUs
    without native bf16 (T4, V100), else fp32."""
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise SftError("train.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
        if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn(
                "train.precision: bf16 on a CPU without native bf16 (no avx512_bf16 or AMX): "
                "its matmuls are emulated and run many times slower than fp32; use "
                "train.precision=auto (fp32 here) unless you need bf16 numerics",
                stacklevel=2,
            )
        return precision
    if weights == "float16" and device.type == "cpu":
        raise SftError("model.dtype: float16 needs a CUDA GPU; use auto or bfloat16 on CPU")
    if weights in WEIGHT_PRECISION:  # half-precision weights compute in their own dtype
        return resolve_precision(WEIGHT_PRECISION[weights], device)
    if device.type == "cuda":
        return "bf16" if cuda_has_native_bf16() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Mixed-precision context for forward passes (a no-op in fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # set both ways: the flag is process-wide and must not leak from one run into the next.
    # warn_only: a few CUDA kernels have no deterministic variant; say so instead of failing
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, in a form `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's device only: each rank draws from its own GPU, and a resume may see
        # another number of GPUs (get_rng_state_all saved every visible one)
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda, device = state["cuda"], torch.cuda.current_device()
        if isinstance(cuda, list | tuple):  # older checkpoints: one state per visible GPU
            cuda = cuda[device] if device < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda, device)


# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def _glibc(name: str, *argtypes: Any) -> Any:
    """glibc's function `name` (mallopt, malloc_trim) through ctypes, returning an int, or None
    where the C library has none (macOS, musl)."""
    import ctypes

    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


def _mallopt() -> Any:
    import ctypes

    return _glibc("mallopt", ctypes.c_int, ctypes.c_int)


_KEPT = ("TOP_PAD", "TRIM_THRESHOLD", "MMAP_THRESHOLD")  # what keep_freed_memory sets


def malloc_tuned_by_environment() -> bool:
    """Whether the environment sets one of the glibc malloc parameters `keep_freed_memory`
    would set (MALLOC_TOP_PAD_ and the like, or their glibc.malloc tunables): then sft leaves
    malloc as the user tuned it."""
    tunables = os.environ.get("GLIBC_TUNABLES", "").lower()
    return any(
        f"MALLOC_{name}_" in os.environ or f"glibc.malloc.{name.lower()}=" in tunables
        for name in _KEPT
    )


def keep_freed_memory() -> bool:
    """glibc: keep the memory a training step frees in the process for the next step instead of
    returning it to the OS and faulting it in again (TorchOptions.release_memory false, on CPU).

    glibc's defaults give memory back as soon as the top of a heap is free: the heaps that the
    micro-batch threads' arenas grow during a step are trimmed when the step's tensors are
    freed, and the next step maps them again, a page fault and a zeroed page at a time
    (measured: docs/performance.md, "Kept memory"). Here no heap is trimmed (trim threshold
    2 GiB; top pad 64 MiB, the most a thread's heap holds, so none is released whole either)
    and the mmap threshold is fixed at 32 MiB, the largest glibc allows and what its own
    adjustment reaches (setting any of these turns that adjustment off). Larger blocks are still
    mmapped: the chunked loss keeps its logits buffer itself (`sft_torch.loss.LogitsBuffers`).
    The peak RSS stays about the same (a step's peak is what the heaps hold); the RSS no longer
    falls between steps, until `trim_freed_memory`. Returns False, changing nothing, without
    glibc's mallopt or when the environment sets these parameters
    (`malloc_tuned_by_environment`)."""
    mallopt = _mallopt()
    if mallopt is None or malloc_tuned_by_environment():
        return False
    return all(
        mallopt(param, value)
        for param, value in (
            (M_MMAP_THRESHOLD, 32 << 20),
            (M_TRIM_THRESHOLD, 2**31 - 1),
            (M_TOP_PAD, 64 << 20),
        )
    )


def trim_freed_memory() -> bool:
    """glibc: give the free memory of every heap back to the OS now (`malloc_trim(0)`); the
    trainer calls it when training ends, after `keep_freed_memory` kept it for the steps."""
    import ctypes

    trim = _glibc("malloc_trim", ctypes.c_size_t)
    return trim is not None and bool(trim(0))


def release_freed_memory(threshold: int = 256 << 10) -> bool:
    """glibc: serve every allocation of `threshold` bytes or more with its own mmap, so the
    memory of a freed tensor goes back to the OS at once (TorchOptions.release_memory).

    By default glibc raises its mmap threshold to the size of each large block freed (up to
    32 MiB), so activations and gradients of a training step end up on the heap, where the
    holes that freed tensors leave between live ones are never returned (peak RSS with and
    without it: docs/performance.md). The cost is one mmap per tensor of 256 KiB+, which a step
    allocates a few thousand of. Returns False where there is no glibc mallopt (macOS, musl): nothing changes."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, threshold))
