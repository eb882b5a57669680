"""sft's MindFormers callback for held-out loss during training (see `sft_mindspore.heldout`).

Importing this module registers `SftEvalMonitor` with MindFormers (sft's worker script does);
the YAML names it with the eval rows' file and when to evaluate:

    callbacks: [{type: SftEvalMonitor, dataset: RUN/mindformers/data/eval.npz,
                 every_steps: 50, last_step: 200}]
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindspore.train.callback import Callback

from sft_mindspore.heldout import format_line, result, token_nll


def causal_lm(train_network: Any) -> Any:
    """The LlamaForCausalLM inside MindFormers' train-step wrapper."""
    from mindformers.models.modeling_utils import PreTrainedModel

    for _, cell in train_network.cells_and_names():
        if isinstance(cell, PreTrainedModel):
            return cell
    raise RuntimeError("SftEvalMonitor: no MindFormers model inside the training network")


def held_out_loss(network: Any, input_ids: np.ndarray, labels: np.ndarray, batch: int) -> tuple:
    """(summed token cross-entropy, trained tokens) of `network` in eval mode over the rows
    (input_ids / labels [N, seq_length + 1], labels not shifted), `batch` rows per forward
    (the compiled training batch; the last batch is filled with rows that count nothing)."""
    import mindspore as ms

    tokens, targets = input_ids[:, :-1], labels[:, 1:]
    total, count = 0.0, 0
    was_training = network.training
    network.set_train(False)  # no dropout; the forward returns logits
    try:
        for s in range(0, len(tokens), batch):
            ids, lab = tokens[s : s + batch], targets[s : s + batch]
            fill = batch - len(ids)
            if fill:
                ids = np.concatenate([ids, np.repeat(ids[:1], fill, axis=0)])
                lab = np.concatenate([lab, np.full((fill, lab.shape[1]), -100, lab.dtype)])
            out = network(ms.Tensor(ids, ms.int32), ms.Tensor(lab, ms.int32))
            logits = (out[0] if isinstance(out, tuple) else out).asnumpy()
            nll, n = token_nll(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1))
            total, count = total + nll, count + n
    finally:
        network.set_train(was_training)
    return total, count


@MindFormerRegister.register(MindFormerModuleType.CALLBACK)
class SftEvalMonitor(Callback):  # type: ignore[misc]
    """Held-out loss after every `every_steps`-th step and after `last_step`, printed as one
    `[sft] eval {...}` line that sft records in metrics.jsonl."""

    def __init__(self, dataset: str, every_steps: int = 0, last_step: int = 0) -> None:
        arrays = np.load(dataset)
        self.input_ids, self.labels = arrays["input_ids"], arrays["labels"]
        self.every, self.last = int(every_steps), int(last_step)

    def due(self, step: int) -> bool:
        return step == self.last or bool(self.every and step % self.every == 0)

    def on_train_step_end(self, run_context: Any) -> None:
        params = run_context.original_args()
        step = int(params.cur_step_num)
        if not self.due(step):
            return
        start = time.time()
        element = getattr(params, "train_dataset_element", None)
        batch = int(element[0].shape[0]) if element else len(self.input_ids)
        network = causal_lm(params.train_network)
        total, count = held_out_loss(network, self.input_ids, self.labels, batch)
        if count == 0:
            return  # as torch: no trained token in the eval rows, no eval row
        row = result(step, total, count)
        print(format_line(row), flush=True)
        print(f"[sft] eval of step {step} took {time.time() - start:.1f} s", flush=True)
