"""The layout of a run directory, in one place: what `sft run` writes and where readers look.

RUN_DIR/
  config.yaml        the resolved job spec (`sft run -c RUN_DIR/config.yaml` repeats the run)
  data.json          record accounting; rejects.jsonl: the records that were dropped
  metrics.jsonl      one JSON row per logged step / eval; loss.png plots it
  checkpoints/       step-NNNNNN/ (sft.checkpoints owns the protocol inside)
  final/             the trained weights; each weights directory also holds the tokenizer (with
                     the chat template used in training) and generation_config.json:
    adapter/           LoRA / QLoRA: the PEFT adapter (adapter_config.json, ...)
    model/             full / freeze: the HF model (config.json, *.safetensors); MindSpore also
                       writes the merged model here for LoRA (torch merges with `sft export`)
    mindspore/         MindSpore only: model.ckpt with MindFormers names
  summary.json       written last: what the run produced (removed when a run starts)
  eval/report.json   `eval.prompts` results
  exports/FORMAT/    `sft export` outputs

>>> found = find_final_weights(Path("runs/demo"))
>>> found.adapter or found.model      # the PEFT adapter or full HF model directory

Runs written by sft 0.1.0's torch backend kept the adapter or model in final/ itself; they are
still read (see `find_final_weights`), never written.
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
"""final/model: the full HF model (full / freeze; MindSpore LoRA: the merged model)."""
FINAL_ADAPTER = "adapter"
"""final/adapter: the PEFT adapter (LoRA / QLoRA)."""
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


def final_model_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / FINAL / FINAL_MODEL


def final_adapter_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / FINAL / FINAL_ADAPTER


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
    """RUN/final (its parent is the run directory)."""
    model: Path | None
    """The full HF model directory (final/model), if the run saved one."""
    adapter: Path | None
    """The PEFT adapter directory (final/adapter), if the run saved one."""
    legacy: bool = False
    """Weights in final/ itself, as sft 0.1.0's torch backend wrote them (or a PEFT adapter
    directory given directly); then `model` or `adapter` is `final` itself."""

    @property
    def weights(self) -> Path:
        """The adapter if there is one (it loads onto the base the run trained), else the model:
        the directory holding the tokenizer and generation_config.json to use with them."""
        found = self.adapter or self.model
        assert found is not None
        return found


def find_final_weights(path: str | Path) -> FinalWeights | None:
    """The trained weights of a run directory, or of its final/ directory given directly; None
    when `path` is neither (a plain HF model directory, for one, is not a run).

    Both backends write final/adapter and/or final/model. For compatibility, a run written by
    sft 0.1.0's torch backend (the adapter or full model in final/ itself) is read as well, and
    so is a PEFT adapter directory given directly, as before."""
    path = Path(path)
    for final in (path / FINAL, path):
        model = final / FINAL_MODEL
        adapter = final / FINAL_ADAPTER
        found = FinalWeights(
            final,
            model if is_model_dir(model) else None,
            adapter if is_adapter_dir(adapter) else None,
        )
        if found.model or found.adapter:
            return found
    legacy = path / FINAL
    if is_adapter_dir(legacy):
        return FinalWeights(legacy, None, legacy, legacy=True)
    if is_model_dir(legacy):
        return FinalWeights(legacy, legacy, None, legacy=True)
    if is_adapter_dir(path):
        return FinalWeights(path, None, path, legacy=True)
    return None
