"""find_final_weights reads both backends' final/ layouts, and nothing that is not a run."""

from __future__ import annotations

from pathlib import Path

from sft.rundir import FinalWeights, find_final_weights


def _model(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")
    return d


def _adapter(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.safetensors").write_bytes(b"")
    return d


def test_torch_layouts_keep_the_weights_in_final(tmp_path) -> None:
    lora, full = tmp_path / "lora", tmp_path / "full"
    _adapter(lora / "final")
    _model(full / "final")
    assert find_final_weights(lora) == FinalWeights(lora / "final", None, lora / "final")
    assert find_final_weights(full) == FinalWeights(full / "final", full / "final", None)


def test_mindspore_layout_has_model_and_adapter_subdirectories(tmp_path) -> None:
    final = tmp_path / "run" / "final"
    _model(final / "model")
    _adapter(final / "adapter")
    (final / "mindspore").mkdir()
    want = FinalWeights(final, final / "model", final / "adapter")
    assert find_final_weights(tmp_path / "run") == want
    assert find_final_weights(final) == want  # the final/ directory given directly


def test_a_plain_model_directory_or_an_unfinished_run_is_not_a_finished_run(tmp_path) -> None:
    assert find_final_weights(_model(tmp_path / "hf")) is None
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("model: x\n")
    assert find_final_weights(tmp_path / "run") is None
    no_weights = tmp_path / "odd" / "final"
    no_weights.mkdir(parents=True)
    (no_weights / "config.json").write_text("{}")  # no safetensors
    assert find_final_weights(tmp_path / "odd") is None
