"""Model parallelism on MindFormers: the final export merges the ranks' shards or writes no model
(never a shard as a model), and the batch arithmetic under pipeline parallelism follows
MindFormers' own rule (global batch = batch_size x data_parallel x micro_batch_num).

No Ascend here, so no real tensor-parallel run: the run directories below are what such a run
leaves behind (per-rank checkpoints, with or without strategy files).

$ .venvs/ms/bin/python -m pytest tests/backends/mindspore/test_model_parallel.py
"""

from __future__ import annotations

import pytest

pytest.importorskip("mindspore")

from sft.errors import SftError
from sft.safetensors_io import read_dir
from sft_mindspore import runtime
from sft_mindspore.export import export_final
from sft_mindspore.weights import hf_to_ms_name, save_ckpt

from tests.backends.mindspore.conftest import make_plan
from tests.backends.mindspore.test_ascend_settings import ASCEND, ascend_doc

pytestmark = pytest.mark.mindspore


def _rank_checkpoints(output, model, ranks: int) -> None:
    """A checkpoint per rank where MindFormers saves them (the contents do not matter here)."""
    full = {hf_to_ms_name(k): v for k, v in read_dir(model).items()}
    for r in range(ranks):
        save_ckpt(full, output / "checkpoint" / f"rank_{r}" / f"sft_rank_{r}-1_6.ckpt")


def _plan(tmp_path, model, tp: int):
    return make_plan(
        tmp_path / "run",
        model,
        "full",
        parallel={"nproc_per_node": 2, "tensor_parallel": tp},
    )


def test_data_parallel_exports_rank0_which_holds_every_weight(tmp_path, tiny_llama):
    plan = _plan(tmp_path, tiny_llama, tp=1)
    output = plan.run_dir / "mindformers" / "output"
    _rank_checkpoints(output, tiny_llama, 2)
    outputs = export_final(plan, output)
    assert (plan.run_dir / "final" / "model" / "model.safetensors").is_file() and outputs["model"]


@pytest.mark.parametrize("case", ["no strategy", "missing rank", "bad strategy"])
def test_tensor_parallel_shards_are_never_exported_as_a_model(tmp_path, tiny_llama, case):
    plan = _plan(tmp_path, tiny_llama, tp=2)
    output = plan.run_dir / "mindformers" / "output"
    _rank_checkpoints(output, tiny_llama, 1 if case == "missing rank" else 2)
    if case != "no strategy":
        (output / "strategy").mkdir(parents=True)
        for r in range(2):
            (output / "strategy" / f"ckpt_strategy_rank_{r}.ckpt").write_bytes(b"not protobuf")
    stale = plan.run_dir / "final" / "model"
    stale.mkdir(parents=True)  # an older run's model must not survive either
    want = {
        "no strategy": "no parallel strategy files",
        "missing rank": "checkpoints of rank_1 are not under",
        "bad strategy": "mindspore.transform_checkpoints failed",
    }[case]
    with pytest.raises(SftError, match=f"final model was NOT written.*{want}"):
        export_final(plan, output)
    assert not (plan.run_dir / "final").exists()


def _strategy_file(tensors: dict, split: dict, path) -> None:
    """A MindSpore parallel strategy file (its protobuf format, as MindFormers writes one per
    rank) for 2-way tensor parallelism: `split` weights are cut by rows over the 2 devices,
    the others replicated."""
    from mindspore.train import node_strategy_pb2

    smap = node_strategy_pb2.ParallelStrategyMap()
    smap.current_stage = 0
    op = smap.parallel_strategy_item.add()  # one operator strategy, as every real file has
    op.node_name = "Default/network-LlamaForCausalLM/MatMul-op0"
    op.parallel_strategys.stage = 0
    op.parallel_strategys.parallel_strategy.add().dim.extend([2, 1])
    for name, t in tensors.items():
        item = smap.parallel_layout_item.add()
        item.param_name = name
        layout = item.parallel_layouts
        layout.dev_matrix.add().dim.extend([2])
        rest = [-1] * (t.data.ndim - 1)
        layout.tensor_map.add().dim.extend([0, *rest] if split[name] else [-1, *rest])
        layout.param_split_shape.add()
        layout.indices_offset.add()
        layout.field = 0  # no embedding field split, no optimizer-state sharding
        layout.opt_weight_shard_step = 0
        layout.opt_weight_shard_size = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(smap.SerializeToString())


def test_tensor_parallel_shards_are_merged_into_the_full_model(tmp_path, tiny_llama):
    """Each rank holds half the rows of the q and gate projections; the export merges them with
    mindspore.transform_checkpoints and writes exactly the full weights (rank 0's shard alone
    would have half the rows)."""
    import numpy as np
    from sft.safetensors_io import Tensor

    plan = _plan(tmp_path, tiny_llama, tp=2)
    output = plan.run_dir / "mindformers" / "output"
    full = {hf_to_ms_name(k): v for k, v in read_dir(tiny_llama).items()}
    split = {k: k.endswith(("wq.weight", "w1.weight")) for k in full}
    for r in range(2):
        _strategy_file(full, split, output / "strategy" / f"ckpt_strategy_rank_{r}.ckpt")
        shard = {
            k: Tensor(np.ascontiguousarray(np.split(t.data, 2)[r]), t.dtype) if split[k] else t
            for k, t in full.items()
        }
        save_ckpt(shard, output / "checkpoint" / f"rank_{r}" / f"sft_rank_{r}-1_6.ckpt")
    export_final(plan, output)
    exported = read_dir(plan.run_dir / "final" / "model")
    original = read_dir(tiny_llama)
    assert sum(split.values()) == 4 and exported.keys() == original.keys()
    for k, t in original.items():
        assert np.array_equal(exported[k].data, t.data), k


# (nproc_per_node, nnodes, tensor, pipeline, context, micro_batch_size, accumulation)
LAYOUTS = [
    (8, 1, 1, 1, 1, 1, 1),
    (8, 1, 1, 1, 1, 2, 4),
    (8, 1, 2, 1, 1, 1, 2),
    (8, 1, 1, 2, 1, 1, 1),
    (8, 1, 1, 2, 1, 2, 4),
    (8, 1, 2, 2, 1, 1, 8),
    (8, 2, 2, 4, 1, 1, 2),
    (8, 2, 1, 2, 2, 1, 4),
]


@pytest.mark.parametrize("nproc,nnodes,tp,pp,cp,micro,accum", LAYOUTS)
def test_global_batch_under_pipeline_parallel_matches_mindformers_rule(
    tmp_path, tiny_llama, nproc, nnodes, tp, pp, cp, micro, accum
):
    world = nproc * nnodes
    text = (
        f"parallel: {{nproc_per_node: {nproc}, nnodes: {nnodes}, tensor_parallel: {tp}, "
        f"pipeline_parallel: {pp}, context_parallel: {cp}}}\n"
        f"train: {{micro_batch_size: {micro}, gradient_accumulation_steps: {accum}}}\n"
        + ASCEND
        % ""
    )
    doc = ascend_doc(tmp_path, tiny_llama, text)
    pc, rc = doc["parallel_config"], doc["runner_config"]
    dp = world // (tp * pp * cp)
    assert (pc["data_parallel"], pc["model_parallel"], pc["pipeline_stage"]) == (dp, tp, pp)
    # sft's global batch (rows per optimizer step) is what MindFormers computes from the YAML
    assert runtime.global_batch(doc) == micro * accum * world
    if pp > 1:
        assert pc["micro_batch_num"] == accum * pp >= pp  # every stage gets micro-batches
        assert rc["gradient_accumulation_steps"] == 1  # MindFormers ignores it under pp
    else:
        assert pc["micro_batch_num"] == 1 and rc["gradient_accumulation_steps"] == accum
    assert doc["train_dataset"]["batch_size"] == rc["batch_size"]


def test_mindformers_itself_derives_sfts_global_batch(tmp_path, tiny_llama):
    """The same table through MindFormers' own check (BaseTrainer, installed 1.9)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    paths, want = [], []
    for i, (nproc, nnodes, tp, pp, cp, micro, accum) in enumerate(LAYOUTS):
        text = (
            f"parallel: {{nproc_per_node: {nproc}, nnodes: {nnodes}, tensor_parallel: {tp}, "
            f"pipeline_parallel: {pp}, context_parallel: {cp}}}\n"
            f"train: {{micro_batch_size: {micro}, gradient_accumulation_steps: {accum}}}\n"
            + ASCEND
            % ""
        )
        doc = ascend_doc(tmp_path, tiny_llama, text)
        paths.append(tmp_path / f"layout_{i}.yaml")
        paths[-1].write_text(yaml.safe_dump(doc))
        want.append(micro * accum * nproc * nnodes)
    script = Path(__file__).with_name("mf_global_batch.py")
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, paths)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == want
