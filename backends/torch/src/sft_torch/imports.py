"""The torch backend's heavy imports with Python's garbage collector paused, then frozen.

    train = import_train("lora")                # sft_torch.train, transformers, peft

torch, transformers and peft create about 200k objects that live as long as the process. While
they are imported, every few hundred allocations start a collection and the full ones scan all of
them: on SmolLM2-135M LoRA (AVX2 host, 2026-12-03) the collector took 1.36 s of the 7.9 s of
imports and 0.41 s more while the model was built (one full collection over the same objects).
Paused during the imports and then frozen (`gc.freeze`: moved to a generation no collection
scans), they cost nothing later; the collector runs as before for everything made afterwards.
Garbage made before the block is collected first (a cheap collection while torch is not loaded
yet), so what is frozen is what the imports made: modules and their tables, which live as long as
the process anyway.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def long_lived_imports(*modules: str) -> Iterator[None]:
    """Import `modules` in the block with the collector paused, then freeze every object (safe to
    nest). A no-op when they are all imported already (a second run in the same process, tests):
    freezing then would keep whatever garbage the process has made since, for good."""
    if all(name in sys.modules for name in modules):
        yield
        return
    enabled = gc.isenabled()
    gc.collect()  # garbage made before (config, data preparation) is collected, not frozen
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def import_train(method: str) -> Callable[..., Any]:
    """`sft_torch.train.train`, with what a run of `method` imports later anyway (transformers'
    model index, which every model load goes through; peft for LoRA / QLoRA) imported now, in
    `long_lived_imports`' window instead of lazily by the loader, outside it (the collections
    measured above were over these imports)."""
    adapters = method in ("lora", "qlora")
    with long_lived_imports("sft_torch.train", "transformers", *(["peft"] if adapters else [])):
        from transformers import AutoModelForCausalLM  # noqa: F401

        if adapters:
            import peft  # noqa: F401
        from sft_torch.train import train
    return train
