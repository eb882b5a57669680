"""Every field of the job spec is honoured or refused, on every installed backend.

The test walks every leaf field of `RunConfig` (from the pydantic models, so a field added
tomorrow is covered without touching this file), sets a non-default value and asserts one of:

- validation refuses it, naming the field's path (a `ConfigError` problem at that path), or
- what the backend then does differs from the run without it: a real training run on a tiny
  model (torch), or the native plan the backend generates (the MindFormers YAML, the MindRecord
  bytes and the launch command for MindSpore; the plan of the example backend).

A field that is neither fails with its name. `ALLOWED` lists the few fields that by nature change
nothing observable in one run; each entry says why and which test covers it.

    $ .venvs/torch/bin/python -m pytest tests/core/test_field_coverage.py -q
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from sft import specs
from sft.config import _unwrap_model as _model_of  # the same walk the loader's hints use
from sft.config import load_config
from sft.errors import ConfigError, SftError

from tests.tiny import make_model

pytestmark = pytest.mark.slow

#: Fields that change nothing observable in a single short run, with why and what covers them.
#: Keep it short: anything else must be honoured (observably) or refused.
ALLOWED = {
    "logging.progress": "console output only (the progress bar)",
    "model.trust_remote_code": "a permission: changes nothing for a model without custom code "
    "(tests/reliability/test_security.py checks code is refused without it)",
    "model.allow_pickle": "a permission: changes nothing for a model with safetensors weights "
    "(tests/reliability/test_security.py checks pickle weights are refused without it)",
    "checkpoint.allow_changed": "matters only when resuming a changed run "
    "(tests/backends/torch/test_resume.py)",
}

#: Non-default values where the type alone does not give a useful one: {path: value}.
VALUES: dict[str, Any] = {
    "model.name_or_path": "@qwen2",
    "model.dtype": "bfloat16",
    "model.revision": "v1.0",
    "data.train.0.path": "@other_data",
    "data.train.0.format": "alpaca",
    "data.train.0.columns": {"messages": "alt_messages"},
    "data.train.0.roles": {"system": "user"},
    "data.train.0.max_samples": 6,
    "data.train.0.weight": 3.0,
    "data.train.0.split": "test",
    "data.train.0.subset": "second",
    "data.train.0.revision": "main",
    "data.eval": "@other_data",
    "data.eval_fraction": 0.25,
    "data.template": "llama3",
    "data.system_prompt": "Answer in one word.",
    "data.max_seq_len": 48,
    "data.length_policy": "truncate",
    "data.max_drop_fraction": 0.0,
    "data.packing": False,
    "data.cache_dir": "@cache2",
    "method.name": "full",
    "method.target_modules": ["q_proj", "v_proj"],
    "method.modules_to_save": ["lm_head"],
    "method.trainable_modules": ["mlp"],
    "method.trainable_layers": 1,
    "method.init_adapter": "@adapter",
    "train.optimizer": "sgd",
    "train.epochs": 0.5,
    "train.max_steps": 2,
    "train.lr_scheduler": "linear",
    "train.warmup_ratio": 0.5,
    "train.warmup_steps": 2,
    "train.min_lr_ratio": 0.5,
    "train.weight_decay": 0.5,
    "train.betas": [0.5, 0.9],
    "train.eps": 1e-2,
    "train.max_grad_norm": 0.01,
    "train.micro_batch_size": 1,
    "train.gradient_accumulation_steps": 2,
    "train.global_batch_size": 4,
    "train.precision": "bf16",
    "train.nan_policy": "skip",
    "train.max_consecutive_skips": 1,
    "parallel.nproc_per_node": 2,
    "parallel.nnodes": 2,
    "parallel.node_rank": 1,
    "parallel.master_addr": "10.1.2.3",
    "parallel.master_port": 29600,
    "parallel.strategy": "fsdp",
    "parallel.deepspeed_config": "@ds_json",
    "parallel.tensor_parallel": 2,
    "parallel.pipeline_parallel": 2,
    "parallel.context_parallel": 2,
    "parallel.rank_table_file": "@data",  # any file: refused on CPU and by torch
    "checkpoint.every_steps": 1,
    "checkpoint.keep_last": 1,
    "checkpoint.resume": "auto",
    "eval.every_steps": 1,
    "eval.max_batches": 1,
    "eval.prompts": "@prompts",
    "eval.max_new_tokens": 3,
    "export.formats": ["hf"],
    "export.dtype": "bf16",
    "logging.every_steps": 2,
    "logging.trackers": [],
}

#: Settings that make a field's effect observable (the field's value is compared with and
#: without itself, both on top of these): {path: {other path: value}}.
SCENARIOS: dict[str, dict[str, Any]] = {
    "data.train.0.weight": {"data.train": [{"path": "@data"}, {"path": "@other_data"}]},
    "data.group_by_length": {"data.packing": False},
    "data.train.0.split": {"data.train.0.path": "@repo"},
    "data.train.0.subset": {"data.train.0.path": "@repo"},
    "data.on_bad_record": {"data.train.0.path": "@bad_data"},
    "data.eval_fraction": {"data.eval": None},
    "train.epochs": {"train.max_steps": None},
    "train.lr_scheduler": {"train.max_steps": 5},
    "train.warmup_ratio": {"train.warmup_steps": None, "train.max_steps": 5},
    "method.trainable_modules": {"method.trainable_layers": 0},
    "train.nan_policy": {"env": {"SFT_TEST_INJECT_NAN_STEP": "2"}},
    "train.max_consecutive_skips": {
        "train.nan_policy": "skip",
        "env": {"SFT_TEST_INJECT_NAN_STEP": "1,2"},
    },
    "checkpoint.keep_last": {"checkpoint.every_steps": 1},
    "checkpoint.resume": {"resume_from_earlier_run": True},
    "eval.max_new_tokens": {"eval.prompts": "@prompts"},
    "eval.max_batches": {"data.eval": "@other_data"},
    "eval.every_steps": {"data.eval": "@other_data"},
    "export.dtype": {"export.formats": ["hf"]},
    "parallel.nnodes": {"parallel.nproc_per_node": 2},
    "parallel.node_rank": {"parallel.nproc_per_node": 2, "parallel.nnodes": 2},
    "parallel.master_addr": {"parallel.nproc_per_node": 2, "parallel.nnodes": 2},
    "parallel.master_port": {"parallel.nproc_per_node": 2, "parallel.nnodes": 2},
    "parallel.cpu_offload": {"parallel.nproc_per_node": 2, "parallel.strategy": "fsdp"},
    "parallel.deepspeed_config": {"parallel.nproc_per_node": 2, "parallel.strategy": "zero2"},
}

METHOD_VARIANTS = {
    "full": specs.FullMethod,
    "lora": specs.LoraMethod,
    "qlora": specs.QLoraMethod,
    "freeze": specs.FreezeMethod,
}


# ----------------------------------------------------------------------------- the field walk


def _is_list_of_models(ann: Any) -> bool:
    for arg in (ann, *typing.get_args(ann)):
        if typing.get_origin(arg) is list and _model_of(typing.get_args(arg)[0]) is not None:
            return True
    return False


def leaf_fields(model: type[BaseModel] = specs.RunConfig, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf field (list items as `.0.`; method fields once per variant,
    as `method.<field>@<variant>`)."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        if model is specs.RunConfig and name in ("backend", "backend_options", "output_dir"):
            continue  # which backend runs, its own section (checked by core), where outputs go
        path = f"{prefix}{name}"
        ann = field.annotation
        if model is specs.RunConfig and name == "method":
            for variant, cls in METHOD_VARIANTS.items():
                out += [f"method.{f}@{variant}" for f in cls.model_fields if f != "name"]
            out.append("method.name")
            continue
        sub = _model_of(ann)
        if _is_list_of_models(ann) and sub is not None and name == "eval":
            out.append(path)  # data.eval: the same source model as data.train, walked there
        elif _is_list_of_models(ann) and sub is not None:
            out += leaf_fields(sub, f"{path}.0.")
        elif sub is not None and not typing.get_args(ann):
            out += leaf_fields(sub, f"{path}.")
        else:
            out.append(path)
    return out


def field_info(path: str) -> Any:
    field, variant = path.split("@") if "@" in path else (path, None)
    model: Any = METHOD_VARIANTS[variant] if variant else specs.RunConfig
    parts = field.split(".")[1:] if variant else field.split(".")
    info = None
    for part in parts:
        if part.isdigit():
            continue
        info = model.model_fields[part]
        model = _model_of(info.annotation)
    assert info is not None
    return info


def default_value(path: str) -> Any:
    info = field_info(path)
    return None if info.is_required() else info.get_default(call_default_factory=True)


def _literals(ann: Any) -> list[Any]:
    if typing.get_origin(ann) is typing.Literal:
        return list(typing.get_args(ann))
    return [v for arg in typing.get_args(ann) for v in _literals(arg)]


def mutated(path: str, backend: str = "") -> Any:
    """A non-default value for `path`."""
    field = path.split("@")[0]
    if field in BACKEND_VALUES.get(backend, {}):
        return BACKEND_VALUES[backend][field]
    if field in VALUES:
        return VALUES[field]
    default = default_value(path)
    options = [o for o in _literals(field_info(path).annotation) if o != default]
    if options:
        return options[0]
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default / 2 if default else 0.1
    raise AssertionError(f"{path}: add a non-default value to VALUES (default {default!r})")


# ----------------------------------------------------------------------------- the job


QA = [
    ("What is the capital of France?", "Paris."),
    ("Tell me a joke about cats.", "Cats sleep all day long, every day."),
    ("Translate to German: good morning.", "Guten Morgen."),
    ("Write a haiku about the sea.", "Waves fold into foam. Salt wind carries gull voices."),
    ("Hello!", "Hello! How can I help you today?"),
    ("Summarize: the meeting moved to Tuesday.", "Meeting on Tuesday."),
]


def _record(i: int, q: str, a: str, long: bool) -> dict[str, Any]:
    body = (a + " ") * (12 if long else 1)
    msgs = [{"role": "user", "content": f"{q} ({i})"}, {"role": "assistant", "content": body}]
    if i % 2:
        msgs.insert(0, {"role": "system", "content": "You are terse."})
    if i % 3 == 0:  # two assistant turns: mask `last` differs from `assistant`
        msgs += [
            {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": "Done."},
        ]
    return {
        "messages": msgs,
        # the same record readable as alpaca, and under another column name, with other text
        "instruction": f"Repeat: {q}",
        "output": q,
        "alt_messages": [
            {"role": "user", "content": f"Again {i}"},
            {"role": "assistant", "content": "Again."},
        ],
    }


@pytest.fixture(scope="module")
def job_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_job_files(tmp_path_factory.mktemp("coverage"))


def make_job_files(root: Path) -> dict[str, str]:
    files = {}
    for name, shift in (("data", 0), ("other_data", 3)):
        path = root / f"{name}.jsonl"
        with path.open("w") as f:
            for i in range(4):
                for k, (q, a) in enumerate(QA):
                    f.write(json.dumps(_record(i + shift, q, a, long=k == 3 and i == 0)) + "\n")
        files[name] = str(path)
    bad = root / "bad.jsonl"
    bad.write_text(Path(files["data"]).read_text() + '{"messages": 3}\n')
    files["bad_data"] = str(bad)
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"prompt": q, "contains": [a.split()[0]]}) for q, a in QA[:2]) + "\n"
    )
    files["prompts"] = str(prompts)
    ds = root / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False}}))
    files["ds_json"] = str(ds)
    files["cache2"] = str(root / "cache2")
    files["llama"] = str(make_model(root / "llama", arch="llama"))
    files["qwen2"] = str(make_model(root / "qwen2", arch="qwen2"))
    files["adapter"] = str(make_adapter(root / "adapter", files["llama"]))
    files["repo"] = str(make_dataset_repo(root / "repo", files["data"], files["other_data"]))
    return files


def make_adapter(path: Path, model: str) -> Path:
    """A PEFT LoRA adapter of the tiny llama (r 4, no dropout, like base_job's method), with
    non-zero B so that it changes the loss; just its config where peft is not installed (the
    MindSpore backend refuses init_adapter at validation)."""
    path.mkdir()
    if importlib.util.find_spec("peft") is None:
        cfg = {"peft_type": "LORA", "r": 4, "lora_dropout": 0.0}
        (path / "adapter_config.json").write_text(json.dumps(cfg))
        return path
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(model)
    peft_model = get_peft_model(lm, LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(path)
    return path


def make_dataset_repo(path: Path, data: str, other: str) -> Path:
    """A directory laid out like a hub dataset repo: train/test splits of `data` and a second
    subset of `other`, as parquet, mapped by the dataset card."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    card = {
        "configs": [
            {
                "config_name": "default",
                "data_files": [
                    {"split": "train", "path": "data/train-*.parquet"},
                    {"split": "test", "path": "data/test-*.parquet"},
                ],
            },
            {"config_name": "second", "data_files": [{"split": "train", "path": "second/*"}]},
        ]
    }
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    others = [json.loads(line) for line in Path(other).read_text().splitlines()]
    for name, recs in (("data/train", rows), ("data/test", others[:6]), ("second/train", others)):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(recs), path / f"{name}-00000-of-00001.parquet")
    (path / "README.md").write_text("---\n" + yaml.safe_dump(card) + "---\n# tiny\n")
    return path


def base_job(files: dict[str, str], backend: str) -> dict[str, Any]:
    return {
        "backend": backend,
        "model": {"name_or_path": files["llama"]},
        "data": {
            "train": [{"path": files["data"]}],
            "max_seq_len": 128,
            "max_drop_fraction": 0.5,
        },
        "method": {"name": "lora", "r": 4, "dropout": 0.0},
        "train": {
            "max_steps": 3,
            "micro_batch_size": 2,
            "learning_rate": 5e-3,
            "precision": "fp32",
            "warmup_steps": 1,
        },
        "logging": {"progress": False},
    }


def _resolve(value: Any, files: dict[str, str]) -> Any:
    if isinstance(value, str) and value.startswith("@"):
        return files[value[1:]]
    if isinstance(value, list):
        return [_resolve(v, files) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, files) for k, v in value.items()}
    return value


def _set(job: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node: Any = job
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    last = parts[-1]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value


def variant_job(
    files: dict[str, str], backend: str, path: str, with_field: bool
) -> tuple[dict[str, Any], dict[str, str], bool]:
    """(job, environment, resume?) for `path` with or without its non-default value."""
    field, variant = path.split("@") if "@" in path else (path, None)
    job = base_job(files, backend)
    if variant:
        job["method"] = {"name": variant, **({"r": 4, "dropout": 0.0} if "lora" in variant else {})}
    if field == "method.name":
        job["method"] = {"name": "lora"}
    env: dict[str, str] = {}
    resume = False
    for key, value in SCENARIOS.get(field, {}).items():
        if key == "env":
            env.update(value)
        elif key == "resume_from_earlier_run":
            resume = True
        else:
            _set(job, key, _resolve(value, files))
    if with_field:
        value = _resolve(mutated(path, backend), files)
        if field == "data.eval":
            value = [{"path": value}]
        _set(job, field, value)
    return job, env, resume


# ----------------------------------------------------------------------------- observers


TIMING = ("time", "tokens_per_s", "trained_tokens_per_s", "step_time_s", "elapsed_s")
TIMING += ("train_time_s", "wall_time_s", "seconds", "tok_s")


def _hash_dir(path: Path) -> dict[str, str]:
    out = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".gguf", ".ckpt"):
            out[str(f.relative_to(path))] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    return out


def _clean(obj: Any, run_dir: Path) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v, run_dir) for k, v in obj.items() if k not in TIMING and k != "run_dir"}
    if isinstance(obj, list):
        return [_clean(v, run_dir) for v in obj]
    if isinstance(obj, float):
        return round(obj, 6)
    if isinstance(obj, str):
        return obj.replace(str(run_dir), "RUN")
    return obj


def observe_torch(job: dict[str, Any], run_dir: Path, env: dict[str, str], resume: bool) -> Any:
    """What a real `sft run` on the torch backend produced (or the launch it planned)."""
    from sft.backend import TrainPlan
    from sft.run import build_plan, run

    job = copy.deepcopy(job)
    job["output_dir"] = str(run_dir)
    job.setdefault("torch", {}).update({"device": "cpu", "num_threads": 1})
    cfg_path = run_dir.parent / f"{run_dir.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(job))
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        config = load_config(cfg_path)
        if config.parallel.world_size > 1:  # plan the launch; running it is test_distributed's
            from sft_torch.deepspeed import ds_config
            from sft_torch.launch import torchrun_args, worker_config

            plan, _ = build_plan(config)
            assert isinstance(plan, TrainPlan)
            args = torchrun_args(plan, run_dir / "logs")
            ds = (
                ds_config(config, config.train.accumulation(config.parallel.world_size), 2, "fp32")
                if config.parallel.strategy in ("zero2", "zero3")
                else None
            )
            worker = yaml.safe_load(worker_config(plan).read_text())
            return {"launch": args[:-1], "ds": ds, "strategy": worker.get("parallel")}
        if resume:  # a first run to 2 steps with a checkpoint, then this one
            first = copy.deepcopy(job)
            first["train"]["max_steps"] = 2
            first["checkpoint"] = {"every_steps": 1}
            first_path = run_dir.parent / f"{run_dir.name}-first.yaml"
            first_path.write_text(yaml.safe_dump(first))
            run(load_config(first_path))
        summary = run(config)
    except SftError as exc:
        return {"error": str(exc).replace(str(run_dir), "RUN")}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    from sft.events import read_metrics

    return {
        "summary": _clean(
            {**summary, "data_cache": str(Path(summary["data_cache"]).parent)}, run_dir
        ),
        "metrics": _clean(read_metrics(run_dir), run_dir),
        "files": sorted(  # event file names hold a time stamp: their folder is enough
            {str(p.relative_to(run_dir)).split("/events.")[0] for p in run_dir.rglob("*")}
        ),
        "weights": _hash_dir(run_dir),
        "eval": _clean(
            json.loads((run_dir / "eval/report.json").read_text())
            if (run_dir / "eval/report.json").exists()
            else None,
            run_dir,
        ),
    }


def observe_mindspore(job: dict[str, Any], run_dir: Path, env: dict[str, str], resume: bool) -> Any:
    """The native plan of the MindSpore backend, made by the code `train` runs before it
    launches MindFormers: the MindFormers YAML, the MindRecord bytes, the launch command and
    where the data cache lives."""
    from sft.run import build_plan
    from sft_mindspore.launch import msrun_command
    from sft_mindspore.train import prepare

    job = copy.deepcopy(job)
    job["output_dir"] = str(run_dir)
    # node_wait_timeout: a node > 0 waits for node 0's shared inputs, which never come here
    job.setdefault("mindspore", {}).update({"device_target": "CPU", "node_wait_timeout": 1})
    cfg_path = run_dir.parent / f"{run_dir.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(job))
    try:
        config = load_config(cfg_path)
        plan, _ = build_plan(config)
        if resume:  # MindFormers left a checkpoint of an earlier run of this output_dir
            ckpt = run_dir / "mindformers/output/checkpoint/rank_0/sft_rank_0-1_2.ckpt"
            ckpt.parent.mkdir(parents=True)
            ckpt.write_bytes(b"")
            (run_dir / "mindformers/init").mkdir(parents=True)
            (run_dir / "mindformers/init/model.ckpt").write_bytes(b"")
        yaml_path, _, _ = prepare(plan, "CPU")
    except SftError as exc:
        return {"error": str(exc).replace(str(run_dir), "RUN")}
    doc = yaml.safe_load(yaml_path.read_text())
    data = run_dir / "mindformers" / "data"
    return {
        "yaml": _clean(doc, run_dir),
        "data": {
            str(f.relative_to(data)): hashlib.sha256(f.read_bytes()).hexdigest()[:16]
            for f in sorted(data.rglob("*"))
            if f.is_file() and not f.name.endswith(".db")
        },
        "launch": [str(a) for a in msrun_command(Path("run.yaml"), config.parallel, Path("L"))],
        "data_cache": str(Path(plan.data.cache_dir).parent),
    }


#: The example backend is a template that walks the plan and trains nothing (its `trains` is
#: False), so optimization fields cannot change what it does; it is not walked.
OBSERVERS = {"torch": observe_torch, "mindspore": observe_mindspore}

#: Where a backend's non-default value must differ from the shared one: on MindSpore
#: `data.packing: false` is what `auto` resolves to, so the value to check is `true`.
BACKEND_VALUES = {"mindspore": {"data.packing": True}}

#: Observers that see a plan, not a finished run, skip what core does around training; that code
#: (sft.run.after_training, the event hooks, and `eval.prompts` scored by the backend's
#: `evaluate` before and after training) is the same for every backend and is observed in the
#: torch backend's real runs (MindSpore's `evaluate`: tests/backends/mindspore/test_inference.py).
AFTER_TRAINING = (
    "logging.plot",
    "logging.tensorboard",
    "logging.trackers",
    "export.formats",
    "export.dtype",
    "eval.prompts",
    "eval.max_new_tokens",
)
PLAN_ONLY = {"mindspore"}


def _installed(backend: str) -> bool:
    mod = {"torch": "sft_torch", "mindspore": "sft_mindspore"}[backend]
    framework = {"torch": "torch", "mindspore": "mindformers"}[backend]
    return all(importlib.util.find_spec(m) is not None for m in (mod, framework))


# ----------------------------------------------------------------------------- the test


def test_the_walk_finds_every_section() -> None:
    fields = leaf_fields()
    for expected in (
        "model.dtype",
        "data.train.0.max_samples",
        "data.eval",
        "method.r@lora",
        "method.bits@qlora",
        "method.trainable_layers@freeze",
        "train.precision",
        "parallel.cpu_offload",
        "checkpoint.keep_last",
        "eval.prompts",
        "export.dtype",
        "logging.plot",
    ):
        assert expected in fields
    assert len(fields) == len(set(fields)) > 70


def _refused(exc: ConfigError, field: str) -> bool:
    roots = {field, field.replace(".0.", "[0]."), field.replace(".0.", ".")}
    return any(any(p.path == r or p.path.startswith(r) for r in roots) for p in exc.problems)


#: How each field was covered in the last walk, per backend (printed with -s).
VERDICTS: dict[str, dict[str, str]] = {}


def check_backend(backend: str, files: dict[str, str], tmp: Path) -> list[str]:
    """Fields that `backend` neither refuses nor honours observably."""
    verdicts = VERDICTS.setdefault(backend, {})
    observe = OBSERVERS[backend]
    silent, cache = [], {}
    bare, _, _ = variant_job(files, backend, "train.seed", with_field=False)
    load_config_from(bare, tmp / "bare.yaml", {})  # the walk means nothing if this is refused
    assert "error" not in observe(bare, tmp / "bare", {}, False)
    for n, path in enumerate(leaf_fields()):
        field = path.split("@")[0]
        if field in ALLOWED or (backend in PLAN_ONLY and field in AFTER_TRAINING):
            verdicts[path] = "allowed"
            continue
        job, env, resume = variant_job(files, backend, path, with_field=True)
        try:
            refused = None
            load_config_from(job, tmp / f"v{n}.yaml", env)
        except ConfigError as exc:
            refused = exc
        if refused is not None:
            if _refused(refused, field):
                verdicts[path] = "refused"
                continue
            base_job_, _, _ = variant_job(files, backend, path, with_field=False)
            try:
                load_config_from(base_job_, tmp / f"b{n}.yaml", env)
            except ConfigError:
                verdicts[path] = "refused with its scenario"  # e.g. any qlora field on a CPU
                continue
            silent.append(f"{path}: refused, but not at its own path: {refused}")
            continue
        base, _, _ = variant_job(files, backend, path, with_field=False)
        key = json.dumps([base, env, resume], sort_keys=True, default=str)
        if key not in cache:
            cache[key] = observe(base, tmp / f"base{n}", env, resume)
        after = observe(job, tmp / f"run{n}", env, resume)
        verdicts[path] = "honoured"
        if after == cache[key]:
            verdicts[path] = "IGNORED"
            silent.append(f"{path}={mutated(path, backend)!r}: accepted, and nothing changed")
    return silent


def load_config_from(job: dict[str, Any], path: Path, env: dict[str, str]) -> Any:
    path.write_text(yaml.safe_dump(job))
    return load_config(path)


@pytest.mark.parametrize("backend", sorted(OBSERVERS))
def test_every_field_is_honoured_or_refused(
    backend: str, job_files: dict[str, str], tmp_path: Path
) -> None:
    if not _installed(backend):
        pytest.skip(f"backend {backend!r} is not installed in this environment")
    silent = check_backend(backend, job_files, tmp_path)
    verdicts = VERDICTS[backend]
    for path, verdict in verdicts.items():
        print(f"{backend:10s} {verdict:26s} {path}")
    assert not silent, f"backend {backend}: fields accepted but ignored:\n" + "\n".join(silent)
    honoured = sum(v == "honoured" for v in verdicts.values())
    assert honoured >= 40, f"only {honoured} fields were observed to change anything"


def test_an_ignored_value_fails_the_check(
    job_files: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: a value that changes nothing (here train.seed set to its own default, as a
    field wired to nothing would behave) is reported by name."""
    backend = next((b for b in sorted(OBSERVERS) if _installed(b)), None)
    if backend is None:
        pytest.skip("no training backend installed here")
    monkeypatch.setattr("tests.core.test_field_coverage.leaf_fields", lambda *a: ["train.seed"])
    monkeypatch.setitem(VALUES, "train.seed", 42)
    silent = check_backend(backend, job_files, tmp_path)
    assert len(silent) == 1 and silent[0].startswith("train.seed=42: accepted, and nothing")
