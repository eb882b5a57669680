#!/bin/bash
# Qwen2.5-7B full fine-tuning on 2 Ascend nodes x 8 cards with sft's MindSpore backend.
#
#   NODE_RANK=0 examples/ascend/run-2nodes.sh        # on node 0 (MASTER_ADDR is this node)
#   NODE_RANK=1 examples/ascend/run-2nodes.sh        # on node 1
#   RANK_TABLE=examples/ascend/hccl_2x8.json NODE_RANK=... examples/ascend/run-2nodes.sh
#                                                    # launch from an HCCL rank table instead
#
# Run it from the same directory on both nodes, on storage both nodes see (the run directory is
# shared: node 0 writes the MindRecord, the initial checkpoint and the MindFormers YAML once; node
# 1 waits for them). Add --dry-run to print every node's launch commands without training.
# Not run by sft's CI (it has no Ascend device); see docs/mindspore.md, "On Ascend".
set -euo pipefail
NODE_RANK=${NODE_RANK:?set NODE_RANK=0 on the first node, 1 on the second}
MASTER_ADDR=${MASTER_ADDR:-10.0.0.1}
MASTER_PORT=${MASTER_PORT:-8118}
CONFIG=${CONFIG:-examples/ascend/qwen2.5-7b-full.yaml}

launch=(parallel.master_addr="$MASTER_ADDR" parallel.master_port="$MASTER_PORT")
if [[ -n "${RANK_TABLE:-}" ]]; then
    launch=(parallel.rank_table_file="$RANK_TABLE")
fi
exec sft run --backend mindspore --config "$CONFIG" \
    parallel.nnodes=2 parallel.nproc_per_node=8 parallel.node_rank="$NODE_RANK" \
    output_dir=runs/qwen2.5-7b-full-2x8 "${launch[@]}" "$@"
