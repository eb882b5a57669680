"""Torch-side reference for the MindSpore parity tests; runs in the torch environment.

For each job, a plain transformers forward (plus a peft adapter when given) on one batch, with
the loss normalized as MindFormers does: mean token cross-entropy over the batch's labels
!= -100 (labels NOT shifted: position t is predicted from position t-1). All jobs run in one
process so torch is imported once.

    $ $SFT_TORCH_PYTHON tests/backends/mindspore/torch_ref.py JOBS.json OUT.json
    JOBS.json: [{"model": DIR, "batch": "b.npz", "adapter": DIR or null}, ...]
    OUT.json:  [{"loss": 5.12, "tokens": 19}, ...]
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def loss_of(model_dir: str, batch: str, adapter: str | None) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    arrays = np.load(batch)
    ids = torch.from_numpy(arrays["input_ids"].astype(np.int64))
    labels = torch.from_numpy(arrays["labels"].astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="mean",
    )
    return {"loss": float(loss), "tokens": int((labels[:, 1:] != -100).sum())}


def main() -> None:
    jobs_path, out_path = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    with open(jobs_path) as f:
        jobs = json.load(f)
    results = [loss_of(j["model"], j["batch"], j.get("adapter")) for j in jobs]
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
