"""Torch-side reference for the MindSpore parity tests; runs in the torch environment.

Plain transformers forward (plus a peft adapter when given) on one batch, with the loss
normalized as MindFormers does: mean token cross-entropy over the batch's labels != -100
(labels NOT shifted: position t is predicted from position t-1).

    $ $SFT_TORCH_PYTHON tests/backends/mindspore/torch_ref.py MODEL_DIR BATCH.npz OUT.json \\
          [--adapter ADAPTER_DIR]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("batch")
    parser.add_argument("out")
    parser.add_argument("--adapter")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    arrays = np.load(args.batch)
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
    with open(args.out, "w") as f:
        json.dump({"loss": float(loss), "tokens": int((labels[:, 1:] != -100).sum())}, f)


if __name__ == "__main__":
    main()
