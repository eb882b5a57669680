"""The job spec: one validated description of a fine-tuning run, shared by every backend.

Every field is typed and documented here; the same text feeds `sft config schema`, `--help` and
the README. Load a spec with `sft.config.load_config(path, overrides)` rather than building it by
hand: that adds path resolution, backend sections and one error listing every problem.

    $ sft config show --config configs/smollm2-135m/lora.yaml
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    """Base of every spec section: unknown keys are errors, docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


# --------------------------------------------------------------------------------------- model


class ModelSpec(Section):
    name_or_path: str = "smollm2-135m-instruct"
    """A local Hugging Face model directory, a local `.gguf` file, a built-in name
    (`sft models` lists them) or a hub id (downloaded only when online)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the weights are loaded in. `auto`: float32 master weights on every device (the
    compute precision comes from `train.precision`). `bfloat16` with full/freeze training trains
    in pure bf16 (torch: a Kahan-compensated AdamW keeps small updates)."""

    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run. Off unless you trust its author."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name_or_path` is a hub id."""

    allow_pickle: bool = False
    """Allow pickle-based weight files (`.bin`, `.pt`); loaded with `weights_only=True`.
    By default only safetensors are loaded."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # `model: smollm2-135m-instruct` is accepted for `model: {name_or_path: ...}`.
        return {"name_or_path": data} if isinstance(data, str) else data


# ---------------------------------------------------------------------------------------- data


class DataSource(Section):
    path: str
    """A jsonl / json / parquet / csv / arrow file, a glob of them, or a `save_to_disk` directory.
    Relative paths resolve against the config file's directory."""

    format: str = "auto"
    """Record format: `alpaca`, `sharegpt`, `messages`, `prompt_completion`, `text`, a plugin's
    format, or `auto` (detected from the first record's keys)."""

    weight: float | None = Field(None, gt=0)
    """Mixing weight when several sources are given: each source contributes
    `weight / sum(weights)` of the samples of an epoch (its own samples without replacement
    first, then repeated; a source without a weight counts as 1). When no source has a weight,
    the sources are simply concatenated."""

    columns: dict[str, str] = {}
    """Rename columns before conversion, e.g. `{instruction: question, output: answer}` maps the
    format's field name (key) to your column name (value)."""

    roles: dict[str, str] = {}
    """Map your role names to canonical ones (`system`, `user`, `assistant`, `tool`),
    e.g. `{human: user, bot: assistant}`."""

    max_samples: int | None = Field(None, gt=0)
    """Read at most this many records from this source (for quick experiments)."""

    split: str | None = None
    """Split of a dataset repo (a hub id such as `org/name`, or a local directory laid out like
    one, read with `datasets.load_dataset`). Default: `train`. Not for plain files."""

    subset: str | None = None
    """Configuration (subset) of a dataset repo, `load_dataset`'s `name`. Not for plain files."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) of a dataset repo id. Not for local paths."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, str) else data


def _sources(value: Any) -> Any:
    if value is None:
        return value
    if isinstance(value, (str, dict)):
        return [value]
    return value


class DataSpec(Section):
    train: Annotated[list[DataSource], Field(min_length=1)]
    """Training data: one source (path or mapping) or a list of them."""

    eval: list[DataSource] | None = None
    """Held-out data for eval loss / perplexity. Default: none (or `eval_fraction` of train)."""

    eval_fraction: float = Field(0.0, ge=0.0, lt=0.5)
    """Fraction of training records held out for evaluation when `eval` is not given."""

    template: str = "auto"
    """Chat template: `auto` (the tokenizer's own Jinja template), a built-in (`chatml`,
    `llama2`, `llama3`, `vicuna_v1.1`, `alpaca`) or a path to a `.jinja` file."""

    system_prompt: str | None = None
    """System message added to conversations that have none."""

    mask: Literal["assistant", "last", "all"] = "assistant"
    """Which tokens are trained: every assistant turn, the last assistant turn, or all tokens.
    A message's own `train: true|false` field overrides this."""

    max_seq_len: int = Field(2048, ge=8)
    """Maximum tokens per sample (and per packed row)."""

    length_policy: Literal["error", "drop", "truncate", "split"] = "drop"
    """What happens to a sample longer than `max_seq_len`: stop with its file:line (`error`),
    drop it (`drop`, counted), cut it (`truncate`, counted) or cut it into pieces (`split`, only
    for the `text` format). Every drop and cut is counted and reported."""

    packing: bool | Literal["auto"] = "auto"
    """Pack several samples into one row of `max_seq_len` (best-fit decreasing); samples never
    attend to each other. `auto`: on where the backend supports it on this device."""

    group_by_length: bool = True
    """When not packing, batch samples of similar length together to cut padding."""

    on_bad_record: Literal["error", "skip"] = "error"
    """A malformed record stops the run with file:line (`error`) or is counted and written to
    `rejects.jsonl` in the run directory (`skip`)."""

    max_drop_fraction: float = Field(0.05, ge=0.0, le=1.0)
    """Fail before training when more than this fraction of records is dropped or rejected."""

    shuffle: bool = True
    """Shuffle the sample order each epoch (seeded by `train.seed` and the epoch)."""

    cache_dir: str | None = None
    """Where tokenized caches are kept. Default: `$SFT_CACHE_DIR/data` or `~/.cache/sft/data`."""

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _wrap(cls, v: Any) -> Any:
        return _sources(v)


# -------------------------------------------------------------------------------------- method


class _LoraParams(Section):
    r: int = Field(16, gt=0)
    """LoRA rank."""

    alpha: float = Field(32.0, gt=0)
    """LoRA scaling numerator: updates are scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."""

    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""

    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: `all-linear`, a list of names (`[q_proj, v_proj]`) or a regex
    matched against full module names."""

    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""

    use_rslora: bool = False
    """Rank-stabilized LoRA: scale by alpha / sqrt(r)."""

    modules_to_save: list[str] = []
    """Extra modules trained in full and saved with the adapter (e.g. `[lm_head]`)."""


class FullMethod(Section):
    name: Literal["full"] = "full"
    """Train every parameter."""


class LoraMethod(_LoraParams):
    name: Literal["lora"] = "lora"
    """Low-rank adapters on a frozen base (peft on torch, mindpet on MindSpore)."""

    init_adapter: str | None = None
    """Continue training an existing PEFT adapter directory (`adapter_config.json` +
    `adapter_model.safetensors`, e.g. a run's `final/adapter`) instead of fresh adapters; its own r,
    alpha and target modules are used. Relative paths resolve against the config file."""


class QLoraMethod(_LoraParams):
    name: Literal["qlora"] = "qlora"
    """LoRA on a base quantized with bitsandbytes (GPU only)."""

    bits: Literal[4, 8] = 4
    """Bits of the quantized base."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit quantization data type."""

    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit per parameter)."""


class FreezeMethod(Section):
    name: Literal["freeze"] = "freeze"
    """Train only chosen layers/modules; everything else is frozen and skipped in backward."""

    trainable_layers: int = Field(2, ge=0)
    """Number of last decoder layers that train."""

    trainable_modules: list[str] = []
    """Module name patterns (regex, matched against full parameter names) that also train, e.g.
    `[mlp]` or `[lm_head]`. With `trainable_layers: 0` only these train."""

    train_embeddings: bool = False
    """Also train the input embeddings (and a tied output head)."""


MethodSpec = Annotated[
    FullMethod | LoraMethod | QLoraMethod | FreezeMethod, Field(discriminator="name")
]
METHOD_NAMES = ("full", "lora", "qlora", "freeze")


# --------------------------------------------------------------------------------------- train


class TrainSpec(Section):
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (fractions allowed). Ignored when `max_steps` is set."""

    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps."""

    learning_rate: float = Field(2e-4, gt=0, lt=1)
    """Peak learning rate."""

    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""

    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Fraction of the steps spent warming up linearly from 0 (ignored if `warmup_steps`)."""

    warmup_steps: int | None = Field(None, ge=0)
    """Warmup steps; overrides `warmup_ratio`."""

    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Final learning rate as a fraction of the peak (cosine and linear)."""

    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd"] = "adamw"
    """`adamw` (torch's), `adamw_8bit` / `paged_adamw_8bit` (bitsandbytes, CUDA only),
    `adafactor` (transformers', with this learning rate and schedule) or `sgd` (momentum
    betas[0])."""

    weight_decay: float = Field(0.0, ge=0)
    """Weight decay (not applied to biases and norms)."""

    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas; with `sgd`, betas[0] is the momentum (betas[1] unused)."""

    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon (the AdamW optimizers only)."""

    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this; `null` disables clipping."""

    micro_batch_size: int = Field(1, gt=0)
    """Rows (samples, or packed rows) per forward pass on each process."""

    gradient_accumulation_steps: int | None = Field(None, gt=0)
    """Micro-batches per optimizer step on each process. Give this or `global_batch_size`."""

    global_batch_size: int | None = Field(None, gt=0)
    """Rows per optimizer step over all processes; must be a multiple of
    micro_batch_size x processes. The loss is normalized by the trained tokens of the whole
    global batch, so it means the same thing at any world size."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision. `auto`: bf16 where the device supports it natively, fp16 with loss
    scaling on CUDA GPUs without native bf16 (T4, V100), else fp32."""

    seed: int = 42
    """Seed for initialization, data order and dropout."""

    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""

    nan_policy: Literal["stop", "skip"] = "stop"
    """On a non-finite loss or gradient norm: stop (naming the step and sample ids) or skip the
    optimizer step."""

    max_consecutive_skips: int = Field(3, ge=1)
    """With `nan_policy: skip`, stop after this many consecutive skipped steps."""

    deterministic: bool = False
    """Use deterministic algorithms (bitwise-reproducible runs; slower on GPU)."""

    @model_validator(mode="after")
    def _optimizer_params(self) -> TrainSpec:
        # Refused rather than ignored: these optimizers have no such parameter.
        unused = {"sgd": ("eps", "betas[1]"), "adafactor": ("eps", "betas")}.get(self.optimizer, ())
        given = {
            "eps": self.eps != 1e-8,
            "betas": tuple(self.betas) != (0.9, 0.999),
            "betas[1]": self.betas[1] != 0.999,
        }
        bad = [k for k in unused if given[k]]
        if bad:
            raise ValueError(
                f"{', '.join(bad)} not used by optimizer {self.optimizer!r} (AdamW only); remove it"
            )
        return self

    @model_validator(mode="after")
    def _batch(self) -> TrainSpec:
        g, m, a = self.global_batch_size, self.micro_batch_size, self.gradient_accumulation_steps
        if g is not None and g % m:
            raise ValueError(
                f"global_batch_size {g} is not a multiple of micro_batch_size {m}; "
                f"use a multiple such as {m * max(1, g // m)}"
            )
        if g is not None and a is not None and g != m * a:
            raise ValueError(
                f"global_batch_size {g} != micro_batch_size {m} x gradient_accumulation_steps "
                f"{a} (single process); give only one of them"
            )
        return self

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each process at this world size."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps or 1
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size {self.global_batch_size} is not divisible by "
                f"micro_batch_size {self.micro_batch_size} x {world_size} processes"
            )
        return self.global_batch_size // per_step


# ------------------------------------------------------------------------------------ parallel


class ParallelSpec(Section):
    nproc_per_node: int = Field(1, gt=0)
    """Processes (devices) per node. More than 1 launches through torchrun / msrun."""

    nnodes: int = Field(1, gt=0)
    """Number of nodes."""

    node_rank: int = Field(0, ge=0)
    """Rank of this node (0 .. nnodes-1)."""

    master_addr: str = "127.0.0.1"
    """Address of node 0 for the rendezvous."""

    master_port: int = Field(29500, gt=0, lt=65536)
    """Port of the rendezvous on node 0."""

    strategy: Literal["ddp", "fsdp", "zero2", "zero3"] = "ddp"
    """Data-parallel strategy: DDP, FSDP2 (fully_shard), or DeepSpeed ZeRO-2/3."""

    cpu_offload: bool = False
    """Offload optimizer state (ZeRO) or parameters (FSDP) to CPU memory."""

    deepspeed_config: str | None = None
    """Your own DeepSpeed JSON, used instead of the generated one (advanced)."""

    tensor_parallel: int = Field(1, gt=0)
    """Tensor (model) parallel degree, for backends that support it (MindSpore)."""

    pipeline_parallel: int = Field(1, gt=0)
    """Pipeline stages, for backends that support it (MindSpore)."""

    context_parallel: int = Field(1, gt=0)
    """Context (sequence) parallel degree, for backends that support it (MindSpore)."""

    rank_table_file: str | None = None
    """An Ascend HCCL rank table (JSON) to launch with instead of a dynamic cluster (MindSpore
    on Ascend): one process per device listed for this node (`server_list[node_rank]`), each
    with RANK_TABLE_FILE / RANK_ID / DEVICE_ID / RANK_SIZE. Default: the RANK_TABLE_FILE
    environment variable when set."""

    @model_validator(mode="after")
    def _ranks(self) -> ParallelSpec:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be < nnodes {self.nnodes}")
        return self

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


# ---------------------------------------------------------------------- checkpoint/eval/export


class CheckpointSpec(Section):
    every_steps: int | None = Field(None, gt=0)
    """Save a resumable checkpoint every N optimizer steps (and always at the end)."""

    keep_last: int = Field(2, ge=1)
    """Keep only the newest N checkpoints."""

    resume: str | None = None
    """`auto` (newest complete checkpoint in the run directory, if any) or a checkpoint path."""

    allow_changed: bool = False
    """Allow resuming although the data cache, sequence length or global batch changed."""


class EvalSpec(Section):
    every_steps: int | None = Field(None, gt=0)
    """Compute eval loss / perplexity every N optimizer steps (and at the end)."""

    max_batches: int | None = Field(None, gt=0)
    """Evaluate on at most this many batches."""

    prompts: str | None = None
    """A jsonl of generation tasks (`prompt` or `messages`, plus `expected` / `contains` /
    `regex`) scored with greedy decoding before and after training."""

    max_new_tokens: int = Field(64, gt=0)
    """Tokens generated per prompt in generation tasks."""


class ExportSpec(Section):
    formats: list[str] = []
    """Exports made after training: `hf` (merged safetensors), `adapter`, `ckpt`, `gguf`."""

    dtype: Literal[
        "f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q4_k_m", "q5_k_m", "q6_k"
    ] = "f16"
    """Dtype of exported weights. The `q*` types are GGUF quantizations (the other formats are
    then written in f16); q4_k_m, q5_k_m and q6_k are made by llama.cpp (llama-cpp-python)."""


class LoggingSpec(Section):
    every_steps: int = Field(1, gt=0)
    """Log metrics every N optimizer steps."""

    progress: bool = True
    """Show a progress bar with loss, tokens/s and ETA."""

    trackers: list[str] | None = None
    """Experiment trackers that record this run: `tensorboard`, `mlflow`, `wandb` (each its own
    plugin; naming one that is not installed is a config error with its install command).
    Default (`null`): TensorBoard when its plugin is installed and `tensorboard` is true;
    `[]` records to none."""

    tensorboard: bool = True
    """With `trackers` unset: write TensorBoard events when its plugin is installed. Superseded
    by `trackers` (setting it to false next to a `trackers` list naming tensorboard is an
    error)."""

    plot: bool = True
    """Write `loss.png` at the end (needs matplotlib)."""


# ----------------------------------------------------------------------------------- top level


class RunConfig(Section):
    """A whole fine-tuning job."""

    backend: str = "torch"
    """Backend that trains: `torch`, `mindspore` or a plugin's (`sft backends` lists them)."""

    model: ModelSpec = ModelSpec()
    """The model to fine-tune."""

    data: DataSpec
    """Training and evaluation data and how it becomes tokens."""

    method: MethodSpec = LoraMethod()
    """Fine-tuning method: `full`, `lora`, `qlora` or `freeze`, with its parameters."""

    train: TrainSpec = TrainSpec()
    """Optimization."""

    parallel: ParallelSpec = ParallelSpec()
    """Processes, nodes and distribution strategy."""

    checkpoint: CheckpointSpec = CheckpointSpec()
    """Resumable checkpoints."""

    eval: EvalSpec = EvalSpec()
    """Evaluation during and after training."""

    export: ExportSpec = ExportSpec()
    """Exports made after training (also available as `sft export`)."""

    logging: LoggingSpec = LoggingSpec()
    """Metrics, progress and plots."""

    output_dir: str | None = None
    """Run directory. Default: `runs/<config dir>-<config name>` in the current directory."""

    backend_options: dict[str, dict[str, Any]] = {}
    """Per-backend sections, written in YAML as top-level keys named after the backend
    (`torch:`, `mindspore:`); each is validated by that backend's own options model."""

    @field_validator("method", mode="before")
    @classmethod
    def _method_shorthand(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"name": v}
        if isinstance(v, dict) and "name" not in v:
            return {"name": "lora", **v}  # the default method, given only its parameters
        return v

    @property
    def options(self) -> dict[str, Any]:
        """The chosen backend's section (raw; validated values are in the run plan)."""
        return self.backend_options.get(self.backend, {})
