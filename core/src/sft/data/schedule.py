"""The step schedule of a run: which rows each optimizer step trains on, and where a resumed run
continues. Every backend walks the same schedule, so the torch and MindSpore backends train on
the same rows in the same steps.

    sched = Schedule.build(plan, rank=0, world=1)
    for pos, step_rows in sched.steps(start=Position(epoch=0, step_in_epoch=0)):
        for mb in sched.micro_batches(step_rows):       # this rank's micro-batches
            batch = collate(split, mb, pad_id)
        pos = next_position(pos, sched.steps_per_epoch)  # where to resume after this step

Row choices come from `sft.data.batching`; this module adds the arithmetic on top (steps per
epoch, total steps, the position of each step). `drop_last=True` skips each epoch's last,
incomplete step, for a backend that compiles one static batch shape and cannot fill that step
(the MindSpore backend fills it with filler records of no trained token, so it keeps the step).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from sft.data.batching import (
    Row,
    epoch_rows,
    global_steps,
    micro_batches,
    shard_for_rank,
    steps_per_epoch,
)
from sft.data.cache import TokenizedSplit
from sft.errors import SftError

if TYPE_CHECKING:
    from sft.backend import TrainPlan
    from sft.specs import RunConfig


@dataclass(frozen=True)
class Position:
    """Where training stands in the data: the next step to run is step `step_in_epoch` of
    `epoch`, the `global_step`-th optimizer step of the run (0-based)."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def next_position(pos: Position, steps_per_epoch: int) -> Position:
    """The position after the step at `pos` has been taken."""
    if pos.step_in_epoch + 1 >= steps_per_epoch:
        return Position(pos.epoch + 1, 0, pos.global_step + 1)
    return Position(pos.epoch, pos.step_in_epoch + 1, pos.global_step + 1)


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
    drop_last: bool = False
    """Skip each epoch's last step when it holds fewer than `rows_per_step` rows."""

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.accumulation * self.world

    @classmethod
    def build(cls, plan: TrainPlan, rank: int, world: int, drop_last: bool = False) -> Schedule:
        """The schedule of `plan`'s training split for process `rank` of `world`."""
        return cls.for_split(
            plan.data.train,
            plan.config,
            packing=plan.packing,
            rank=rank,
            world=world,
            drop_last=drop_last,
        )

    @classmethod
    def for_split(
        cls,
        split: TokenizedSplit,
        config: RunConfig,
        *,
        packing: bool,
        rank: int,
        world: int,
        drop_last: bool = False,
    ) -> Schedule:
        tr, d = config.train, config.data
        try:
            accum = tr.accumulation(world)
        except ValueError as exc:
            raise SftError(f"train.global_batch_size: {exc}") from exc
        if len(split) == 0 and not drop_last:
            raise SftError("data.train: no training samples left after preparation")
        s = cls(
            split,
            d.max_seq_len,
            packing,
            d.shuffle,
            d.group_by_length and not packing,
            tr.seed,
            tr.micro_batch_size,
            accum,
            rank,
            world,
            total_steps=0,
            steps_per_epoch=0,
            drop_last=drop_last,
        )
        s.steps_per_epoch = steps_per_epoch(len(s.rows(0)), s.rows_per_step, drop_last)
        if s.steps_per_epoch == 0:
            raise SftError(
                f"data.train: {len(split)} samples do not fill one optimizer step of "
                f"{s.rows_per_step} rows (train.micro_batch_size x accumulation x processes); "
                "add data or lower the batch size"
            )
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

    def epoch_steps(self, epoch: int) -> Iterator[list[Row]]:
        """The global rows of each step of `epoch`, in order."""
        return global_steps(self.rows(epoch), self.rows_per_step, self.drop_last)

    def steps(self, start: Position | None = None) -> Iterator[tuple[Position, list[Row]]]:
        """(position of the step, its global rows) from `start` until `total_steps`. A resumed
        run starts mid-epoch without replaying or reordering anything."""
        start = start or Position()
        epoch, skip, step = start.epoch, start.step_in_epoch, start.global_step
        while step < self.total_steps:
            for i, rows in enumerate(self.epoch_steps(epoch)):
                if i < skip:
                    continue
                yield Position(epoch, i, step), rows
                step += 1
                if step >= self.total_steps:
                    return
            epoch, skip = epoch + 1, 0

    def micro_batches(self, step_rows: list[Row]) -> list[list[Row]]:
        """This rank's micro-batches of one global step."""
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
