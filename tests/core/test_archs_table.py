"""docs/models.md shows the architecture matrix of `sft.archs`, and models outside it warn.

$ .venvs/core/bin/python -m pytest tests/core/test_archs_table.py
"""

from __future__ import annotations

from pathlib import Path

from sft.archs import ARCHITECTURES, markdown_table, nearest, notice

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def test_docs_table_is_the_generated_one():
    text = DOC.read_text()
    assert markdown_table() in text, (
        "docs/models.md is out of date: paste sft.archs.markdown_table() into it"
    )


def test_architectures_outside_the_matrix_warn_with_the_nearest_tested_one():
    assert notice("qwen2", "torch") is None
    msg = notice("qwen2_moe", "torch")
    assert msg is not None and "'qwen2_moe'" in msg and "nearest tested one is 'qwen" in msg
    assert nearest("mistral3") == "mistral" and nearest("gemma3") == "gemma3_text"


def test_cli_lists_the_matrix(capsys):
    from sft.cli import main

    assert main(["models", "--architectures"]) == 0
    out = capsys.readouterr().out
    for name, a in ARCHITECTURES.items():
        assert f"{name}  ({a.quirks})" in out
        assert f"gguf: {a.gguf}" in out
