"""From a tokenized split to the exact batches every backend trains on.

Both backends call these functions, so a step of the torch backend and a step of the MindSpore
backend see the same rows in the same order.

    rows = pack_rows([3, 7, 4], max_seq_len=8)             # [[1], [2, 0]]
    plan = epoch_rows(split.lengths, max_seq_len=8, packing=True, shuffle=True, seed=42, epoch=0)
    for step_rows in global_steps(plan, rows_per_step=8):   # one optimizer step
        mine = shard_for_rank(step_rows, rank, world)       # this process's rows
        for mb in micro_batches(mine, micro_batch_size=2):
            batch = collate(split, mb, pad_id=0)            # numpy dict, see `collate`

A row is a list of sample indices (one sample when not packing). `collate` pads rows to the
longest row of the micro-batch; packed rows get position ids that restart at each sample and
`seq_lens` so the backend can keep samples from attending to each other.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import numpy as np

from sft.data.cache import IGNORE_INDEX, TokenizedSplit

Row = list[int]


def pack_rows(lengths: Sequence[int] | np.ndarray, max_seq_len: int) -> list[Row]:
    """Best-fit-decreasing bin packing of sample indices into rows of at most `max_seq_len`.

    Samples are placed longest first into the row with the least room that still fits them.
    Deterministic: ties keep index order. >>> pack_rows([3, 7, 4], 8) == [[1], [2, 0]]
    """
    rows: list[Row] = []
    for i, r in _best_fit(lengths, max_seq_len):
        if r == len(rows):
            rows.append([])
        rows[r].append(i)
    return rows


def packed_row_count(lengths: Sequence[int] | np.ndarray, max_seq_len: int) -> int:
    """`len(pack_rows(lengths, max_seq_len))`, without holding the rows (memory: one number
    per row, not per sample)."""
    return max((r + 1 for _, r in _best_fit(lengths, max_seq_len)), default=0)


def _best_fit(lengths: Sequence[int] | np.ndarray, max_seq_len: int) -> Iterator[tuple[int, int]]:
    """(sample, row) for each sample, longest first (ties in index order); row numbers are
    given out in order. The order is one int64 array, walked in blocks."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    # (free space, row index) kept sorted so the best fit is found by bisection
    free: list[tuple[int, int]] = []
    rows = 0
    for start in range(0, len(order), 1 << 16):
        block = order[start : start + (1 << 16)]
        for i, n in zip(block.tolist(), lengths[block].tolist(), strict=True):
            if n > max_seq_len:
                raise ValueError(f"sample {i} has {n} tokens > max_seq_len {max_seq_len}")
            pos = bisect.bisect_left(free, (n, -1))
            if pos < len(free):
                room, r = free.pop(pos)
                bisect.insort(free, (room - n, r))
            else:
                r, rows = rows, rows + 1
                bisect.insort(free, (max_seq_len - n, r))
            yield i, r


def epoch_rows(
    lengths: Sequence[int] | np.ndarray,
    *,
    max_seq_len: int,
    packing: bool,
    shuffle: bool,
    seed: int,
    epoch: int,
    group_by_length: bool = False,
    rows_per_group: int = 1,
) -> list[Row]:
    """The ordered rows of one epoch. Packing is deterministic; the row order is shuffled with
    `seed + epoch`. Without packing, `group_by_length` sorts each window of 64 x `rows_per_group`
    rows by length and shuffles whole groups so padding stays small."""
    rng = np.random.default_rng([seed, epoch])
    if packing:
        rows = pack_rows(lengths, max_seq_len)
        if shuffle:
            rows = [rows[i] for i in rng.permutation(len(rows))]
        return rows
    idx = rng.permutation(len(lengths)).tolist() if shuffle else list(range(len(lengths)))
    if group_by_length and rows_per_group > 1:
        window = 64 * rows_per_group
        out: list[int] = []
        for s in range(0, len(idx), window):
            out += sorted(idx[s : s + window], key=lambda i: -int(lengths[i]))
        groups = [out[s : s + rows_per_group] for s in range(0, len(out), rows_per_group)]
        if shuffle:
            groups = [groups[i] for i in rng.permutation(len(groups))]
        idx = [i for g in groups for i in g]
    return [[i] for i in idx]


def global_steps(
    rows: list[Row], rows_per_step: int, drop_last: bool = False
) -> Iterator[list[Row]]:
    """Rows grouped into optimizer steps of `rows_per_step` (= micro x accumulation x world).
    The last, smaller step is kept unless `drop_last`; the loss is normalized by its own
    trained-token count, so a short step is still an honest mean."""
    for s in range(0, len(rows), rows_per_step):
        chunk = rows[s : s + rows_per_step]
        if drop_last and len(chunk) < rows_per_step:
            return
        yield chunk


def steps_per_epoch(n_rows: int, rows_per_step: int, drop_last: bool = False) -> int:
    return n_rows // rows_per_step if drop_last else -(-n_rows // rows_per_step)


def shard_for_rank(step_rows: list[Row], rank: int, world: int) -> list[Row]:
    """This rank's share of a global step: every `world`-th row, starting at `rank`."""
    return step_rows[rank::world]


def micro_batches(rows: list[Row], micro_batch_size: int) -> list[list[Row]]:
    return [rows[s : s + micro_batch_size] for s in range(0, len(rows), micro_batch_size)]


def count_trained(split: TokenizedSplit, rows: list[Row]) -> int:
    """Trained (predicted) tokens in these rows: the loss normalizer of a global step."""
    total = 0
    for row in rows:
        for i in row:
            _, lab = split.sample(i)
            total += int(np.count_nonzero(lab[1:] != IGNORE_INDEX))
    return total


def collate(
    split: TokenizedSplit, rows: list[Row], pad_id: int, pad_to: int | None = None
) -> dict[str, np.ndarray]:
    """Numpy arrays for one micro-batch (B rows, padded to L = longest row or `pad_to`):

    - input_ids [B, L] int64, pad_id after the row's tokens
    - labels [B, L] int64, -100 on masked tokens, padding, and each sample's first token (so
      the shift never predicts a sample's first token from the previous sample in a packed row)
    - position_ids [B, L] int64, restarting at 0 for each sample
    - attention_mask [B, L] int64, 1 on tokens, 0 on padding
    - seq_lens: list (per row) of sample lengths, for block-diagonal attention / cu_seqlens
    - sample_index [B, S] int64 (-1 padded): which samples are in each row (for error reports)
    """
    lens = [sum(int(split.offsets[i + 1] - split.offsets[i]) for i in row) for row in rows]
    L = max(lens) if pad_to is None else pad_to
    B = len(rows)
    ids = np.full((B, L), pad_id, dtype=np.int64)
    lab = np.full((B, L), IGNORE_INDEX, dtype=np.int64)
    pos = np.zeros((B, L), dtype=np.int64)
    att = np.zeros((B, L), dtype=np.int64)
    width = max(len(r) for r in rows)
    sidx = np.full((B, width), -1, dtype=np.int64)
    seq_lens: list[list[int]] = []
    for b, row in enumerate(rows):
        t = 0
        seq_lens.append([])
        for j, i in enumerate(row):
            s_ids, s_lab = split.sample(i)
            n = len(s_ids)
            ids[b, t : t + n] = s_ids
            lab[b, t : t + n] = s_lab
            lab[b, t] = IGNORE_INDEX
            pos[b, t : t + n] = np.arange(n)
            att[b, t : t + n] = 1
            sidx[b, j] = i
            seq_lens[b].append(n)
            t += n
    return {
        "input_ids": ids,
        "labels": lab,
        "position_ids": pos,
        "attention_mask": att,
        "seq_lens": seq_lens,  # type: ignore[dict-item]
        "sample_index": sidx,
    }
