"""The MindFormers worker script sft launches (MindFormers' own run_mindformer.py is not in its wheel).

One process trains one rank: `MindFormerConfig(yaml) -> build_context -> Trainer(config).train()`,
with the CPU workarounds applied first when the YAML's context says CPU. sft runs it with the
environment's python for one worker, or under msrun for several:

    $ python -m sft_mindspore.worker --config RUN_DIR/mindformers.yaml
    $ msrun --worker_num 2 --local_worker_num 2 --master_port 8118 --log_dir RUN_DIR/msrun \\
          --join True $(python -c "import sft_mindspore.worker as e; print(e.__file__)") \\
          --config RUN_DIR/mindformers.yaml

The same YAML works with MindFormers' run_mindformer.py on Ascend.

`--loss-of CKPT --batch NPZ --out JSON` instead computes, with the same MindFormers network
(LoRA cells included), the training loss of a checkpoint's weights on one batch (input_ids,
labels as in the MindRecord); tests use it to compare final weights across frameworks.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="MindFormers YAML written by sft")
    parser.add_argument("--loss-of", help="checkpoint whose loss on --batch is computed")
    parser.add_argument("--batch", help=".npz with input_ids and labels [B, seq_length + 1]")
    parser.add_argument("--out", help="JSON file the loss is written to")
    args = parser.parse_args(argv)

    from mindformers import MindFormerConfig, Trainer, build_context

    import sft_mindspore.heldout_callback  # registers SftEvalMonitor (eval rows)
    import sft_mindspore.lr  # noqa: F401  registers SftWarmUpDecayLR, the YAML's lr_schedule
    from sft_mindspore.cpu_compat import apply_runtime_patches

    config = MindFormerConfig(args.config)
    device = str(config.context.device_target)
    for patch in apply_runtime_patches(device):
        print(f"[sft] cpu_compat: {patch}", flush=True)
    if args.loss_of:
        config.use_parallel = False
        build_context(config)
        return loss_of(config, args.loss_of, args.batch, args.out)
    from sft_mindspore import callbacks

    callbacks.use_sft_monitor(config)  # + a checkpoint at the step after SIGTERM / SIGINT
    build_context(config)
    with callbacks.STOP:
        Trainer(config).train()
    rank = os.environ.get("RANK_ID", "0")
    if callbacks.STOPPED or (callbacks.AGREE is None and callbacks.STOP.requested):
        import signal

        signame, step = (callbacks.STOPPED or [(str(callbacks.STOP.requested), -1)])[0]
        print(f"[sft] rank {rank} stopped by {signame} after step {step}", flush=True)
        if callbacks.AGREE is not None:
            # msrun SIGKILLs every other worker as soon as one exits non-zero (they may still
            # be writing their checkpoint); sft run reads the stop from the agreement file
            return 0
        return 128 + int(signal.Signals[signame])
    print(f"[sft] rank {rank} finished", flush=True)
    return 0


def loss_of(config: object, ckpt: str, batch: str, out: str) -> int:
    """Build the YAML's network, load `ckpt`, write its mean token loss on `batch` to `out`."""
    import json

    import mindspore as ms
    import numpy as np
    from mindformers.models.build_model import build_network

    arrays = np.load(batch)
    config.model.model_config.batch_size = int(arrays["input_ids"].shape[0])  # type: ignore
    network = build_network(config.model)  # type: ignore[attr-defined]
    not_loaded, _ = ms.load_param_into_net(network, ms.load_checkpoint(ckpt))
    if not_loaded:
        raise SystemExit(f"{ckpt} lacks parameters of the network: {not_loaded[:5]}")
    network.set_train(True)  # the training forward returns the loss
    loss = network(ms.Tensor(arrays["input_ids"], ms.int32), ms.Tensor(arrays["labels"], ms.int32))
    with open(out, "w") as f:
        json.dump({"loss": float(loss.asnumpy()), "ckpt": ckpt}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
