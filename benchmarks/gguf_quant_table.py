"""The GGUF quantization table of docs/gguf.md: per --dtype, file size, perplexity on the held-out
text in llama.cpp, and llama.cpp's generation speed, for a model directory (SmolLM2 by default).

    $ SFT_CACHE_DIR=/tmp/c .venvs/torch/bin/sft models prepare smollm2-135m-instruct   # prints DIR
    $ .venvs/torch/bin/python benchmarks/gguf_quant_table.py DIR --out /tmp/gguf-table

Needs llama-cpp-python (built by `make venv-torch-dev`).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

DTYPES = ["f16", "q8_0", "q6_k", "q5_k_m", "q5_1", "q5_0", "q4_k_m", "q4_1", "q4_0"]
HELDOUT = Path(__file__).parent.parent / "tests" / "plugins" / "gguf" / "data" / "heldout.txt"


def perplexity(llm, ids: list[int]) -> float:
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    top = logits.max(-1)
    logz = np.log(np.exp(logits - top[:, None]).sum(-1)) + top
    return float(np.exp(np.mean(logz - logits[np.arange(len(ids) - 1), ids[1:]])))


def main() -> None:
    import llama_cpp
    from sft.export import ExportRequest, run_export

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", type=Path)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gguf-table"))
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    args = ap.parse_args()
    rows, base = [], None
    print("| --dtype | file MB | tensor types | perplexity | vs f16 | gen tokens/s | export s |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        started = time.perf_counter()
        report = run_export("gguf", ExportRequest(args.model, args.out, dtype))
        seconds = time.perf_counter() - started
        assert report.ok, report.checks["problems"]
        llm = llama_cpp.Llama(
            model_path=report.path,
            n_ctx=512,
            n_batch=512,
            n_threads=args.threads,
            logits_all=True,
            verbose=False,
        )
        ids = llm.tokenize(HELDOUT.read_text().encode(), add_bos=False)
        ppl = perplexity(llm, ids)
        base = base or ppl
        llm.reset()
        t0 = time.perf_counter()
        out = llm.create_completion("The river town", max_tokens=64, temperature=0.0)
        n = out["usage"]["completion_tokens"]
        speed = n / (time.perf_counter() - t0)
        types = ", ".join(f"{k} {v}" for k, v in sorted(report.checks["tensor_types"].items()))
        size = Path(report.path).stat().st_size / 1e6
        rows.append((dtype, size, ppl, speed))
        print(
            f"| {dtype} | {size:.1f} | {types} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f} % "
            f"| {speed:.0f} | {seconds:.0f} |",
            flush=True,
        )
        Path(report.path).unlink()


if __name__ == "__main__":
    main()
