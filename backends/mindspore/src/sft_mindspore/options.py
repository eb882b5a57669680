"""The `mindspore:` section of a job spec (its own module so that runtime and inference code can
take the typed options without importing the plugin)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class MindSporeOptions(BaseModel):
    """The `mindspore:` section of a job spec."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    device_target: Literal["auto", "Ascend", "CPU"] = "auto"
    """Device: `Ascend` (NPU), `CPU`, or `auto` (Ascend when CANN is present, else CPU)."""

    threads: int | None = Field(None, gt=0)
    """CPU threads per worker (OMP_NUM_THREADS). Default: the machine's cores / workers."""

    device_kind: Literal["auto", "910A", "910B", "910B4", "910C"] = "auto"
    """Ascend chip: `910A` (32 GB, no bf16), `910B` (910B1-B3, 64 GB), `910B4` (32 GB), `910C`
    (64 GB per die). `auto`: asked from MindSpore on the Ascend host when the run starts. Sets
    the default `max_device_memory` and `train.precision: auto` (fp16 on 910A, else bf16);
    bf16 on a 910A is refused."""

    max_device_memory: str | None = None
    """Device memory MindSpore may use, e.g. `58GB` (context.max_device_memory). Default: the
    device's size as MindSpore reports it minus a reserve (58GB on 64 GB, 29GB on 32 GB), else
    from `device_kind`, else 29GB (fits a 32 GB card). On CPU only an explicit value is written."""

    jit_level: Literal["O0", "O1", "O2"] | None = None
    """Graph compilation level (context.jit_config.jit_level): O0 = kernel by kernel, O1 =
    with operator fusion, O2 = whole-graph sinking (Ascend only). Default: O1 on Ascend, MindSpore's
    own on CPU."""

    memory_optimize_level: Literal["O0", "O1"] | None = None
    """context.memory_optimize_level: O1 reuses device memory more aggressively (what
    MindFormers' reference configs use). Default: O1 on Ascend, MindSpore's own on CPU."""

    optimizer_shard: bool | Literal["auto"] = "auto"
    """MindFormers' parallel optimizer (parallel.enable_parallel_optimizer): shard optimizer
    state and updates over the data-parallel devices (like ZeRO-1). `auto`: on for Ascend runs
    with data parallel > 1. Needs Ascend (semi-auto parallel)."""

    loss_scale: Literal["dynamic"] | float | None = None
    """fp16 only (train.precision: fp16): `dynamic` (MindFormers' DynamicLossScaleUpdateCell,
    start 65536, x2 / 1000 steps; the default) or a fixed scale (runner_wrapper.scale_sense)."""

    hccl_connect_timeout: int | None = Field(None, gt=0)
    """Seconds HCCL waits for all devices to connect (HCCL_CONNECT_TIMEOUT; HCCL's default is
    120). Raise it for many nodes or slow starts. Exported to every worker."""

    hccl_exec_timeout: int | None = Field(None, gt=0)
    """Seconds a collective may wait for the other devices (HCCL_EXEC_TIMEOUT). Exported."""

    hccl_buffsize: int | None = Field(None, gt=0)
    """HCCL communication buffer per device in MB (HCCL_BUFFSIZE; HCCL's default 200). Exported."""

    hccl_if_ip: str | None = None
    """Host NIC address HCCL uses for its host-side setup on this node (HCCL_IF_IP). Exported."""

    node_wait_timeout: int = Field(3600, gt=0)
    """With several nodes, seconds nodes other than 0 wait for node 0 to write the shared inputs
    (MindRecord, initial checkpoint, MindFormers YAML) into the shared run directory."""

    @field_validator("max_device_memory")
    @classmethod
    def _memory(cls, v: str | None) -> str | None:
        from sft_mindspore.runtime import check_memory_value

        return check_memory_value(v)

    @field_validator("loss_scale")
    @classmethod
    def _scale(cls, v: Any) -> Any:
        if isinstance(v, float) and v <= 0:
            raise ValueError("a fixed loss scale must be > 0, e.g. 1024.0, or use `dynamic`")
        return v
