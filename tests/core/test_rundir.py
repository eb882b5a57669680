"""find_final_weights reads the final/ layout both backends write, the older torch layout, and
nothing that is not a run."""

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


def test_adapter_and_model_subdirectories_alone(tmp_path) -> None:
    lora, full = tmp_path / "lora", tmp_path / "full"
    _adapter(lora / "final" / "adapter")
    _model(full / "final" / "model")
    found = find_final_weights(lora)
    assert found == FinalWeights(lora / "final", None, lora / "final" / "adapter")
    assert found.weights == lora / "final" / "adapter"
    found = find_final_weights(full)
    assert found == FinalWeights(full / "final", full / "final" / "model", None)
    assert found.weights == full / "final" / "model"


def test_runs_of_the_previous_torch_release_keep_the_weights_in_final(tmp_path) -> None:
    lora, full = tmp_path / "lora", tmp_path / "full"
    _adapter(lora / "final")
    _model(full / "final")
    want = FinalWeights(lora / "final", None, lora / "final", legacy=True)
    assert find_final_weights(lora) == want
    assert find_final_weights(lora / "final") == want  # final/ given directly
    want = FinalWeights(full / "final", full / "final", None, legacy=True)
    assert find_final_weights(full) == want


def test_mindspore_layout_has_model_and_adapter_subdirectories(tmp_path) -> None:
    final = tmp_path / "run" / "final"
    _model(final / "model")
    _adapter(final / "adapter")
    (final / "mindspore").mkdir()
    want = FinalWeights(final, final / "model", final / "adapter")
    assert find_final_weights(tmp_path / "run") == want
    assert find_final_weights(final) == want  # the final/ directory given directly
    assert want.weights == final / "adapter"  # the adapter loads onto the base the run trained


def test_a_plain_model_directory_or_an_unfinished_run_is_not_a_finished_run(tmp_path) -> None:
    assert find_final_weights(_model(tmp_path / "hf")) is None
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("model: x\n")
    assert find_final_weights(tmp_path / "run") is None
    no_weights = tmp_path / "odd" / "final"
    no_weights.mkdir(parents=True)
    (no_weights / "config.json").write_text("{}")  # no safetensors
    assert find_final_weights(tmp_path / "odd") is None
