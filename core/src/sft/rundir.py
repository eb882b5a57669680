"""The layout of a run directory, in one place: what `sft run` writes and where readers look.

RUN_DIR/
  config.yaml        the resolved job spec (`sft run -c RUN_DIR/config.yaml` repeats the run)
  data.json          record accounting; rejects.jsonl: the records that were dropped
  metrics.jsonl      one JSON row per logged step / eval; loss.png plots it
  checkpoints/       step-NNNNNN/ (sft.checkpoints owns the protocol inside)
  final/             the trained weights, tokenizer and generation_config.json:
                       torch: the adapter (adapter_config.json) or full model in final/
                       MindSpore: final/model (merged HF), final/adapter (PEFT), final/mindspore
  summary.json       written last: what the run produced (removed when a run starts)
  eval/report.json   `eval.prompts` results
  exports/FORMAT/    `sft export` outputs

>>> found = find_final_weights(Path("runs/demo"))
>>> found.adapter or found.model      # the PEFT adapter or full HF model directory
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
DATA_REPORT = "data.json"
REJECTS = "rejects.jsonl"
LOSS_PLOT = "loss.png"
CHECKPOINTS = "checkpoints"
FINAL = "final"
FINAL_MODEL = "model"
"""final/model: a full HF model next to an adapter (MindSpore writes both)."""
FINAL_ADAPTER = "adapter"
"""final/adapter: the PEFT adapter when final/ holds more than one kind of weights."""
EVAL_REPORT = "eval/report.json"
EXPORTS = "exports"


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG


def summary_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / SUMMARY


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def final_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / FINAL


def export_dir(run_dir: str | Path, fmt: str) -> Path:
    return Path(run_dir) / EXPORTS / fmt


def is_model_dir(path: Path) -> bool:
    """A full Hugging Face model: config.json and safetensors weights, not a PEFT adapter."""
    return (
        (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
        and not (path / "adapter_config.json").exists()
    )


def is_adapter_dir(path: Path) -> bool:
    """A PEFT adapter directory (adapter_config.json)."""
    return (path / "adapter_config.json").is_file()


@dataclass(frozen=True)
class FinalWeights:
    """What a finished run's final/ directory holds."""

    final: Path
    """RUN/final: the tokenizer, chat template and generation_config.json live here."""
    model: Path | None
    """A full HF model directory (final/model or final/ itself), if the run saved one."""
    adapter: Path | None
    """A PEFT adapter directory (final/ itself or final/adapter), if the run saved one."""


def find_final_weights(path: str | Path) -> FinalWeights | None:
    """The trained weights of a run directory, or of its final/ directory given directly; None
    when `path` is neither (a plain HF model directory, for one, is not a run)."""
    path = Path(path)
    for final, models in ((path / FINAL, (FINAL_MODEL, "")), (path, (FINAL_MODEL,))):
        model = next((final / m for m in models if is_model_dir(final / m)), None)
        adapter = next((final / a for a in ("", FINAL_ADAPTER) if is_adapter_dir(final / a)), None)
        if model or adapter:
            return FinalWeights(final, model, adapter)
    return None
