"""The example backend: a template for third-party backends, used by the contract tests.

It implements the backend contract honestly without a framework: it walks the exact schedule of
global steps a real backend would train on, checks every row, and writes `example-report.json`.

    $ sft run --backend example --config configs/smollm2-135m/lora.yaml example.fail_on=none
"""

from __future__ import annotations

import json
from typing import Any, Literal

import sft
import sft.errors
from pydantic import BaseModel, ConfigDict, Field
from sft.backend import TrainPlan, TrainResult
from sft.data.batching import count_trained
from sft.data.cache import IGNORE_INDEX
from sft.data.schedule import Schedule
from sft.events import RunEvents
from sft.specs import RunConfig


class ExampleOptions(BaseModel):
    """The `example:` section of a job spec."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    report_name: str = "example-report.json"
    """File written into the run directory."""

    max_steps: int | None = Field(None, gt=0)
    """Walk at most this many global steps (the whole schedule by default)."""

    fail_on: Literal["none", "invalid"] = "invalid"
    """Raise when the plan is inconsistent (`invalid`), or only report it (`none`)."""


class ExampleBackend:
    name = "example"
    description = "Template backend: checks the plan and reports it (trains nothing)"
    capabilities = frozenset({"full", "lora", "freeze", "packing", "ddp"})
    install_hint = "pip install -e plugins/example-backend"
    Options = ExampleOptions
    trains = False  # it walks the plan and trains nothing: never suggested for a field

    def check_available(self) -> None:
        return None  # needs nothing beyond core

    def validate(self, config: RunConfig) -> list[str]:
        if config.parallel.nnodes > 1:
            return ["parallel.nnodes: the example backend runs on one node"]
        return []

    def train(self, plan: TrainPlan, events: RunEvents) -> TrainResult:
        opts: ExampleOptions = plan.options  # type: ignore[assignment]
        cfg, split = plan.config, plan.data.train
        vocab = int(plan.model.config.get("vocab_size", 0))
        sched = Schedule.build(plan, rank=0, world=cfg.parallel.world_size)
        rows_per_step = sched.rows_per_step
        problems: list[str] = []
        seen: set[int] = set()
        steps = trained = 0
        for step, step_rows in enumerate(sched.epoch_steps(0), start=1):  # one epoch
            for row in step_rows:
                problems += self._check_row(plan, row, vocab)
                seen.update(row)
            mbs = sched.micro_batches(step_rows)
            n = count_trained(split, step_rows)
            trained += n
            events.log(step, {"trained_tokens": n, "micro_batches_rank0": len(mbs)})
            steps = step
            if opts.max_steps and step >= opts.max_steps:
                break
        if not opts.max_steps and len(seen) != len(split):
            problems.append(f"schedule covers {len(seen)} of {len(split)} samples")
        report: dict[str, Any] = {
            "model_dir": str(plan.model.path),
            "model_type": plan.model.model_type,
            "method": cfg.method.name,
            "packing": plan.packing,
            "samples": len(split),
            "rows_per_step": rows_per_step,
            "steps": steps,
            "trained_tokens": trained,
            "data_key": plan.data.key,
            "options": opts.model_dump(),
            "problems": problems,
        }
        (plan.run_dir / opts.report_name).write_text(json.dumps(report, indent=2))
        if problems and opts.fail_on == "invalid":
            raise sft.errors.SftError(
                "example backend found an invalid plan: " + "; ".join(problems[:5])
            )
        return TrainResult(
            steps=steps,
            final_loss=None,
            outputs={"report": opts.report_name},
            metrics={"trained_tokens": trained},
        )

    @staticmethod
    def _check_row(plan: TrainPlan, row: list[int], vocab: int) -> list[str]:
        split, out = plan.data.train, []
        total = 0
        for i in row:
            ids, labels = split.sample(i)
            total += len(ids)
            if vocab and (ids.min() < 0 or ids.max() >= vocab):
                out.append(f"sample {i}: token id outside the vocabulary of {vocab}")
            bad = (labels != IGNORE_INDEX) & (labels != ids)
            if bad.any():
                out.append(f"sample {i}: a label differs from its token id")
        if total > plan.config.data.max_seq_len:
            out.append(f"row {row} has {total} tokens > max_seq_len")
        return out


@sft.hookimpl
def sft_register_backends(register: Any) -> None:
    register(ExampleBackend())
