"""The torch side of batching: a schedule's rows as torch tensors on a device.

Which rows each step trains on is core's `sft.data.schedule` (shared with every backend):

    sched = Schedule.build(plan, rank=0, world=1)
    for pos, step_rows in sched.steps(start=Position(epoch=0, step_in_epoch=0)):
        for mb in sched.micro_batches(step_rows):       # this rank's micro-batches
            batch = load_batch(split, mb, pad_id, device)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sft.data.batching import Row, collate
from sft.data.cache import TokenizedSplit


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Numpy arrays -> torch tensors on `device` (seq_lens stays a list)."""
    return {
        k: torch.from_numpy(v).to(device) if isinstance(v, np.ndarray) else v
        for k, v in batch.items()
    }


def load_batch(
    split: TokenizedSplit, rows: list[Row], pad_id: int, device: torch.device
) -> dict[str, Any]:
    return to_device(collate(split, rows, pad_id), device)
