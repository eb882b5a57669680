"""Peak memory of `prepare_data` on a large generated jsonl (not a test): how much of the file
preparation holds at once.

    $ .venvs/torch/bin/python benchmarks/data_rss.py --mb 500 [--tokenizer DIR]

Writes a chat jsonl of about `--mb` MB (varied records, 0.5-2 KB each), prepares it with the
tiny test tokenizer (or `--tokenizer`), and prints the file size, record and token counts,
wall time and peak RSS of this process and its data workers (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = [
    "the",
    "a",
    "model",
    "data",
    "token",
    "train",
    "loss",
    "batch",
    "step",
    "learn",
    "answer",
    "question",
    "river",
    "stone",
]


def write_jsonl(path: Path, mb: int) -> int:
    rng, n, size = random.Random(0), 0, 0
    with path.open("w") as f:
        while size < mb << 20:
            q = " ".join(rng.choices(WORDS, k=rng.randint(10, 60)))
            a = " ".join(rng.choices(WORDS, k=rng.randint(60, 300)))
            line = json.dumps(
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            )
            f.write(line + "\n")
            size += len(line) + 1
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--tokenizer", type=Path)
    args = ap.parse_args()
    from sft.data.pipeline import prepare_data
    from sft.models import ResolvedModel
    from sft.specs import RunConfig

    from tests.tiny import make_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="sft-rss-"))
    tok = args.tokenizer or make_tokenizer(tmp / "tok")
    data = tmp / "big.jsonl"
    records = write_jsonl(data, args.mb)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = RunConfig.model_validate(
        {"data": {"train": str(data), "max_seq_len": 2048, "cache_dir": str(tmp / "cache")}}
    )
    model = ResolvedModel(path=Path(tok), spec=str(tok), model_type="llama", config={})
    start = time.time()
    prepared = prepare_data(cfg, model)
    wall = time.time() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    tokens = int(prepared.train.offsets[-1])
    print(
        json.dumps(
            {
                "file_mb": round(data.stat().st_size / 2**20, 1),
                "records": records,
                "tokens": tokens,
                "wall_s": round(wall, 1),
                "peak_rss_mb_before_prepare": round(base / 1024),
                "peak_rss_mb": round(own / 1024),
                "peak_rss_mb_largest_worker": round(kids / 1024),
                "token_array_mb": round(tokens * 8 / 2**20),
            }
        )
    )


if __name__ == "__main__":
    main()
