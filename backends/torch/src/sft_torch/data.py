"""The torch side of batching: which rows each optimizer step trains on, as torch tensors.

All row choices come from `sft.data.batching` (shared with every backend); this module only
adds the schedule arithmetic (steps per epoch, where a resumed run continues) and the move to
torch.

    sched = Schedule.build(plan, rank=0, world=1)
    for pos, step_rows in sched.steps(start=Position(epoch=0, step_in_epoch=0)):
        for mb in sched.micro_batches(step_rows):       # this rank's micro-batches
            batch = to_device(collate(split, mb, pad_id), device)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from sft.backend import TrainPlan
from sft.data.batching import (
    Row,
    collate,
    epoch_rows,
    global_steps,
    micro_batches,
    shard_for_rank,
    steps_per_epoch,
)
from sft.data.cache import TokenizedSplit
from sft.errors import SftError


@dataclass(frozen=True)
class Position:
    """Where training stands in the data: the next step to run is step `step_in_epoch` of
    `epoch`, the `global_step`-th optimizer step of the run (0-based)."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Schedule:
    split: TokenizedSplit
    max_seq_len: int
    packing: bool
    shuffle: bool
    group_by_length: bool
    seed: int
    micro_batch_size: int
    accumulation: int
    rank: int
    world: int
    total_steps: int
    steps_per_epoch: int

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.accumulation * self.world

    @classmethod
    def build(cls, plan: TrainPlan, rank: int, world: int) -> Schedule:
        cfg = plan.config
        tr = cfg.train
        try:
            accum = tr.accumulation(world)
        except ValueError as exc:
            raise SftError(f"train.global_batch_size: {exc}") from exc
        split = plan.data.train
        if len(split) == 0:
            raise SftError("data.train: no training samples left after preparation")
        s = cls(
            split,
            cfg.data.max_seq_len,
            plan.packing,
            cfg.data.shuffle,
            cfg.data.group_by_length and not plan.packing,
            tr.seed,
            tr.micro_batch_size,
            accum,
            rank,
            world,
            0,
            0,
        )
        s.steps_per_epoch = steps_per_epoch(len(s.rows(0)), s.rows_per_step)
        s.total_steps = tr.max_steps or max(1, math.ceil(tr.epochs * s.steps_per_epoch))
        return s

    def rows(self, epoch: int) -> list[Row]:
        return epoch_rows(
            self.split.lengths,
            max_seq_len=self.max_seq_len,
            packing=self.packing,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=epoch,
            group_by_length=self.group_by_length,
            rows_per_group=self.micro_batch_size * self.world,
        )

    def steps(self, start: Position) -> Iterator[tuple[Position, list[Row]]]:
        """(position of the step, its global rows) from `start` until `total_steps`. A resumed
        run starts mid-epoch without replaying or reordering anything."""
        epoch, skip, step = start.epoch, start.step_in_epoch, start.global_step
        while step < self.total_steps:
            for i, rows in enumerate(global_steps(self.rows(epoch), self.rows_per_step)):
                if i < skip:
                    continue
                yield Position(epoch, i, step), rows
                step += 1
                if step >= self.total_steps:
                    return
            epoch, skip = epoch + 1, 0

    def micro_batches(self, step_rows: list[Row]) -> list[list[Row]]:
        return micro_batches(
            shard_for_rank(step_rows, self.rank, self.world), self.micro_batch_size
        )

    def fingerprint(self) -> dict[str, Any]:
        """What fixes the data order: a resume with different values would train on other
        rows than the checkpointed run."""
        return {
            "max_seq_len": self.max_seq_len,
            "global_batch": self.rows_per_step,
            "packing": self.packing,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "group_by_length": self.group_by_length,
        }


def next_position(pos: Position, steps_per_epoch: int) -> Position:
    """The position after the step at `pos` has been taken."""
    if pos.step_in_epoch + 1 >= steps_per_epoch:
        return Position(pos.epoch + 1, 0, pos.global_step + 1)
    return Position(pos.epoch, pos.step_in_epoch + 1, pos.global_step + 1)


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
