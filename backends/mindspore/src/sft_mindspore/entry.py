"""The MindFormers entry script sft launches (MindFormers' own run_mindformer.py is not in its wheel).

One process trains one rank: `MindFormerConfig(yaml) -> build_context -> Trainer(config).train()`,
with the CPU workarounds applied first when the YAML's context says CPU. sft runs it with the
environment's python for one worker, or under msrun for several:

    $ python -m sft_mindspore.entry --config RUN_DIR/mindformers.yaml
    $ msrun --worker_num 2 --local_worker_num 2 --master_port 8118 --log_dir RUN_DIR/msrun \\
          --join True $(python -c "import sft_mindspore.entry as e; print(e.__file__)") \\
          --config RUN_DIR/mindformers.yaml

The same YAML works with MindFormers' run_mindformer.py on Ascend.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="MindFormers YAML written by sft")
    args = parser.parse_args(argv)

    from mindformers import MindFormerConfig, Trainer, build_context

    from sft_mindspore.cpu_compat import apply_runtime_patches

    config = MindFormerConfig(args.config)
    device = str(config.context.device_target)
    for patch in apply_runtime_patches(device):
        print(f"[sft] cpu_compat: {patch}", flush=True)
    build_context(config)
    Trainer(config).train()
    print(f"[sft] rank {os.environ.get('RANK_ID', '0')} finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
