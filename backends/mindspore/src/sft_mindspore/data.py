"""The core's tokenized cache written as MindRecord, in MindFormers' legacy SFT schema.

Each record is one row of core batching (`sft.data.batching`), padded to `seq_length + 1`:

    input_ids  int32 [seq_length + 1]   pad_id after the row's tokens
    labels     int32 [seq_length + 1]   NOT shifted; -100 on prompt, padding and each sample's
                                        first token (exactly `sft.data.batching.collate`)

Records are written in the order MindFormers consumes them, so the MindSpore backend trains on
the same rows, in the same optimizer steps, as the torch backend: global step after global step,
each step's rows in core order. `MindDataset(num_shards=W, shard_id=r)` hands rank r every W-th
record, which is exactly `shard_for_rank(step_rows, r, W)` when a rank's batch is
`rows_per_step / W` rows.

MindFormers compiles one static batch shape, so an epoch's short last step (fewer rows than
`rows_per_step`, which the torch backend trains as it is) is filled up to `rows_per_step` with
filler records after its real rows: input all `pad_id`, labels all -100. They hold no trained
token, so they add nothing to the loss's numerator or its trained-token denominator, nor to the
gradient: the step trains exactly torch's short step. Filling at the end keeps each rank's real
rows `shard_for_rank(real_rows, r, W)`; a rank (or, on Ascend, an accumulated micro-batch) whose
share is only filler adds 0 to the summed token losses and 0 to the trained-token count, which
MindFormers' per-token loss sums across them (its denominators carry +1e-8: no 0 / 0).

    $ sft data prepare --config configs/smollm2-135m/lora.yaml --format mindrecord --out data/
    >>> import mindspore.dataset as ds
    >>> ds.MindDataset("data/train.mindrecord", columns_list=["input_ids", "labels"])

`--format hf-arrow` writes the same records as an HF arrow directory (datasets.save_to_disk).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sft.data.batching import Row, collate, epoch_rows
from sft.data.cache import TokenizedSplit
from sft.data.schedule import Schedule

COLUMNS = ["input_ids", "labels"]
_PAGE = 1 << 15  # small pages: MindRecord's defaults make a 64-row file ~50 MB


FILLER: Row = []
"""A filler record: no sample, so `collate` gives pad ids and -100 labels (0 trained tokens)."""


@dataclass
class RecordSchedule:
    """Core's step schedule written out for MindFormers: `steps[s]` is the list of real rows of
    global step s (core's `Schedule`, the torch backend's steps), in the order the records are
    written; `rows` adds the filler records that bring a short step up to `rows_per_step`."""

    steps: list[list[Row]]
    rows_per_step: int
    seq_length: int
    dropped_rows: int = 0
    """Rows of the schedule that no step trains. 0: a short last step is filled, not dropped
    (kept in summary.json, where MindSpore runs before the filling reported the rows of each
    epoch's dropped short step)."""
    epochs: list[int] | None = None
    """0-based epoch of each step (metrics.jsonl's `epoch`)."""

    @property
    def rows(self) -> list[Row]:
        """Every record in write order: each step's real rows, then its filler."""
        return [r for step in self.steps for r in step + [FILLER] * self.filler(step)]

    def filler(self, step: list[Row]) -> int:
        return self.rows_per_step - len(step)

    @property
    def filler_rows(self) -> int:
        return sum(self.filler(step) for step in self.steps)


def seq_length_for(split: TokenizedSplit, max_seq_len: int) -> int:
    """The static sequence length MindFormers compiles for: the longest sample (rows hold
    `seq_length + 1` tokens because the model drops one on the shift), rounded up to 8."""
    longest = int(split.lengths.max()) if len(split) else 8
    return min(max(8, -(-longest // 8) * 8), max(max_seq_len, longest))


def build_schedule(split: TokenizedSplit, config: Any, world: int = 1) -> RecordSchedule:
    """The run's global steps: exactly core's `Schedule` (the steps the torch backend walks),
    an epoch's short last step included (`rows` fills it to the static batch shape)."""
    sched = Schedule.for_split(split, config, packing=False, rank=0, world=world)
    steps: list[list[Row]] = []
    epochs: list[int] = []
    for pos, rows in sched.steps():
        steps.append(rows)
        epochs.append(pos.epoch)
    seq_length = seq_length_for(split, config.data.max_seq_len)
    return RecordSchedule(steps, sched.rows_per_step, seq_length, epochs=epochs)


def row_arrays(
    split: TokenizedSplit, rows: list[Row], pad_id: int, seq_length: int
) -> dict[str, np.ndarray]:
    """input_ids / labels [len(rows), seq_length + 1] int32, as the legacy schema wants."""
    batch = collate(split, rows, pad_id=pad_id, pad_to=seq_length + 1)
    return {k: batch[k].astype(np.int32) for k in COLUMNS}


def write_mindrecord(
    split: TokenizedSplit, rows: list[Row], pad_id: int, seq_length: int, path: str | Path
) -> Path:
    """Write `rows` (in this order) as one MindRecord file (plus its `.db` index)."""
    from mindspore.mindrecord import FileWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = FileWriter(str(path), shard_num=1, overwrite=True)
    writer.set_page_size(_PAGE)
    writer.set_header_size(_PAGE)
    writer.add_schema({c: {"type": "int32", "shape": [-1]} for c in COLUMNS}, "sft legacy SFT")
    for s in range(0, len(rows), 256):  # bounded memory for large caches
        arrays = row_arrays(split, rows[s : s + 256], pad_id, seq_length)
        writer.write_raw_data(
            [{c: arrays[c][i] for c in COLUMNS} for i in range(len(arrays["labels"]))]
        )
    writer.commit()
    return path


def write_training_data(
    split: TokenizedSplit, schedule: RecordSchedule, pad_id: int, out_dir: str | Path
) -> Path:
    """The run's training MindRecord plus `schedule.json` (which samples each step holds: its
    real rows; `filler_rows` counts the filler records written after short steps' rows)."""
    out_dir = Path(out_dir)
    path = write_mindrecord(
        split, schedule.rows, pad_id, schedule.seq_length, out_dir / "train.mindrecord"
    )
    (out_dir / "schedule.json").write_text(
        json.dumps(
            {
                "rows_per_step": schedule.rows_per_step,
                "seq_length": schedule.seq_length,
                "dropped_rows": schedule.dropped_rows,
                "filler_rows": schedule.filler_rows,
                "steps": schedule.steps,
            }
        )
    )
    return path


def read_mindrecord(
    path: str | Path, num_shards: int | None = None, shard_id: int | None = None
) -> list[dict[str, np.ndarray]]:
    """Read records back through `mindspore.dataset.MindDataset` (tests and `sft data` checks)."""
    import mindspore.dataset as ds

    dataset = ds.MindDataset(
        str(path), columns_list=COLUMNS, shuffle=False, num_shards=num_shards, shard_id=shard_id
    )
    return list(dataset.create_dict_iterator(output_numpy=True, num_epochs=1))


def write_arrow(
    split: TokenizedSplit, rows: list[Row], pad_id: int, seq_length: int, path: str | Path
) -> Path:
    """The same records as an HF arrow directory (`datasets` save_to_disk), the alternative
    MindFormers >= 1.7 reads with `data_loader: {type: HFDataLoader, load_func: load_from_disk}`."""
    import datasets

    arrays = row_arrays(split, rows, pad_id, seq_length)
    table = datasets.Dataset.from_dict({c: arrays[c].tolist() for c in COLUMNS})
    table.save_to_disk(str(path))
    return Path(path)


def write_prepared(data: Any, out_dir: str | Path, config: Any, fmt: str = "mindrecord") -> str:
    """`sft data prepare --format mindrecord|hf-arrow`: train (and eval) splits in core order, one
    record per sample, padded to the split's longest sample."""
    out_dir = Path(out_dir)
    for name in ("train", "eval"):
        split = getattr(data, name)
        if split is None or not len(split):
            continue
        rows = epoch_rows(
            split.lengths,
            max_seq_len=config.data.max_seq_len,
            packing=False,
            shuffle=config.data.shuffle and name == "train",
            seed=config.train.seed,
            epoch=0,
        )
        seq = seq_length_for(split, config.data.max_seq_len)
        if fmt == "hf-arrow":
            write_arrow(split, rows, data.pad_id, seq, out_dir / name)
        else:
            write_mindrecord(split, rows, data.pad_id, seq, out_dir / f"{name}.mindrecord")
    (out_dir / f"{fmt}.json").write_text(
        json.dumps(
            {
                "columns": COLUMNS,
                "cache": str(data.cache_dir),
                "key": data.key,
                "pad_id": data.pad_id,
                "labels": "not shifted, -100 where not trained",
            },
            indent=2,
        )
    )
    return str(out_dir / ("train" if fmt == "hf-arrow" else "train.mindrecord"))
