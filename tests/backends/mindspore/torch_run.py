"""The torch side of the MindSpore parity tests: trains the same spec on the same token data with
the torch backend (runs in the torch environment, started by `conftest.torch_train`).

    $ $SFT_TORCH_PYTHON tests/backends/mindspore/torch_run.py JOB.json
    JOB.json: {"config": {...RunConfig, backend torch...}, "samples": [[ids, labels], ...],
               "model": DIR, "run_dir": DIR, "pad_id": 0, "eos_ids": [2]}

Writes into run_dir what `sft run` would (metrics.jsonl, final/, summary.json with the backend's
metrics), plus `init_lora_a.npz`: every peft lora_A matrix before the first step, keyed by its
Hugging Face module name.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
from sft.backend import TrainPlan
from sft.data.cache import PreparedData, TokenizedSplit
from sft.events import RunEvents
from sft.models import load_resolved
from sft.plugins import get_plugins
from sft.specs import RunConfig
from sft_torch.plugin import TorchOptions
from sft_torch.train import Trainer, fit

_LORA_A = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_A\.[^.]+\.weight$")


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig.model_validate({**job["config"], "output_dir": str(run_dir)})
    split = TokenizedSplit.from_samples([(ids, labels) for ids, labels in job["samples"]])
    data = PreparedData(
        cache_dir=run_dir / "cache",
        key="synthetic",
        train=split,
        eval=None,
        tokenizer_dir=job["model"],
        pad_id=job["pad_id"],
        eos_ids=job["eos_ids"],
    )
    plan = TrainPlan(
        config=cfg,
        options=TorchOptions(device="cpu", num_threads=1),
        run_dir=run_dir,
        model=load_resolved(Path(job["model"]), job["model"]),
        data=data,
    )
    trainer = Trainer(plan, RunEvents(cfg, run_dir, get_plugins().hook))
    init = {}
    for name, p in trainer.model.named_parameters():
        m = _LORA_A.match(name)
        if m:
            init[m[1]] = p.detach().float().numpy().copy()
    np.savez(run_dir / "init_lora_a.npz", **init)
    result = fit(trainer)
    summary = {"steps": result.steps, "final_loss": result.final_loss, "metrics": result.metrics}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
