"""Reading records (jsonl, json arrays, csv, parquet, arrow, save_to_disk dirs, globs) and the
built-in formats (alpaca, sharegpt, messages incl. Qwen's jsonl, prompt_completion, text).

    .venvs/torch/bin/python -m pytest tests/core/data/test_sources_formats.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sft.data.conversation import RecordError
from sft.data.formats import convert_record, detect_format
from sft.data.sources import read_source
from sft.errors import SftError
from sft.plugins import get_plugins
from sft.specs import DataSource

ROWS = [
    {"instruction": "Add 2 and 2", "input": "", "output": "4"},
    {"instruction": "Translate", "input": "good morning", "output": "Guten Morgen"},
    {"instruction": "Name a color", "input": "", "output": "blue"},
]


def _convert(record: dict, fmt: str | None = None, **src: object) -> list[tuple[str, str, object]]:
    plugins = get_plugins()
    source = DataSource(path="x", **src)
    fmt = fmt or detect_format(plugins, record, "x:1")
    conv = convert_record(plugins, fmt, source, record, "x:1")
    return [(m.role, m.content, m.train) for m in conv.messages]


def test_json_array_records_know_their_lines(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_text('[\n  {"text": "one"},\n  {"text": "two"},\n\n  7,\n  {"text": "three"}\n]\n')
    recs = list(read_source(DataSource(path=str(f))))
    assert [(r.where, r.data, r.error and r.error.kind) for r in recs] == [
        (f"{f}:2", {"text": "one"}, None),
        (f"{f}:3", {"text": "two"}, None),
        (f"{f}:5", None, "wrong_type"),
        (f"{f}:6", {"text": "three"}, None),
    ]


def test_csv_parquet_arrow_and_save_to_disk_read_the_same(tmp_path: Path) -> None:
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(ROWS)
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)
    pq.write_table(table, tmp_path / "d.parquet")
    # The layout `datasets.Dataset.save_to_disk` writes: arrow stream shards + state.json.
    ds = tmp_path / "saved"
    ds.mkdir()
    with (
        pa.OSFile(str(ds / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as w,
    ):
        w.write_table(table)
    (ds / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    (ds / "dataset_info.json").write_text("{}")
    for path in (tmp_path / "d.csv", tmp_path / "d.parquet", ds):
        recs = list(read_source(DataSource(path=str(path))))
        assert [r.data for r in recs] == ROWS, path
    assert [r.where for r in read_source(DataSource(path=str(tmp_path / "d.csv")))][-1].endswith(
        "d.csv:4"
    )


def test_glob_max_samples_and_column_mapping(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"part{i}.jsonl").write_text(
            "".join(
                json.dumps({"q": f"question {i}.{j}", "a": f"answer {j}"}) + "\n" for j in range(2)
            )
        )
    src = DataSource(
        path=str(tmp_path / "part*.jsonl"),
        max_samples=5,
        columns={"instruction": "q", "output": "a"},
    )
    recs = list(read_source(src))
    assert len(recs) == 5 and recs[-1].where == f"{tmp_path / 'part2.jsonl'}:1"
    assert recs[0].data == {"instruction": "question 0.0", "output": "answer 0"}
    assert _convert(recs[0].data) == [
        ("user", "question 0.0", None),
        ("assistant", "answer 0", None),
    ]


def test_invalid_utf8_is_a_bad_record_with_its_line(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "\xc3\x28"}\n')
    recs = list(read_source(DataSource(path=str(f))))
    assert recs[1].where == f"{f}:2" and recs[1].error.kind == "invalid_utf8"


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SftError, match="no such file, directory or matching glob"):
        list(read_source(DataSource(path=str(tmp_path / "nope*.jsonl"))))


def test_alpaca_with_system_input_and_history() -> None:
    rec = {
        "system": "Be brief.",
        "instruction": "Translate",
        "input": "good morning",
        "output": "Guten Morgen",
        "history": [["Hi", "Hello!"]],
    }
    assert _convert(rec) == [
        ("system", "Be brief.", None),
        ("user", "Hi", None),
        ("assistant", "Hello!", None),
        ("user", "Translate\ngood morning", None),
        ("assistant", "Guten Morgen", None),
    ]


def test_sharegpt_roles_and_role_mapping() -> None:
    rec = {
        "system": "You can call tools.",
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": "get()"},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "Sunny."},
        ],
    }
    assert [r for r, _, _ in _convert(rec)] == ["system", "user", "assistant", "tool", "assistant"]
    custom = {"conversations": [{"from": "me", "value": "Hi"}, {"from": "bot", "value": "Yo"}]}
    assert _convert(custom, roles={"me": "user", "bot": "assistant"})[1] == (
        "assistant",
        "Yo",
        None,
    )
    with pytest.raises(RecordError, match="unknown role 'me'"):
        _convert(custom)


def test_qwen_messages_jsonl_loads_as_is() -> None:
    # The Qwen fine-tuning script's example record, verbatim (type / messages / source).
    rec = {
        "type": "chatml",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is your name?"},
            {"role": "assistant", "content": "My name is Qwen."},
        ],
        "source": "self-made",
    }
    assert detect_format(get_plugins(), rec, "x:1") == "messages"
    assert _convert(rec)[-1] == ("assistant", "My name is Qwen.", None)


def test_messages_train_flags_and_content_parts() -> None:
    rec = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
            },
            {"role": "assistant", "content": "Yo", "train": False},
        ]
    }
    assert _convert(rec) == [("user", "Hi there", None), ("assistant", "Yo", False)]


def test_prompt_completion_and_text() -> None:
    assert _convert({"prompt": "The sky is", "completion": " blue."}) == [
        ("user", "The sky is", None),
        ("assistant", " blue.", None),
    ]
    conv = convert_record(get_plugins(), "text", DataSource(path="x"), {"text": "Once upon"}, "x:1")
    assert conv.plain and [m.content for m in conv.messages] == ["Once upon"]
    lists = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "completion": [{"role": "assistant", "content": "Yo"}],
    }
    assert _convert(lists) == [("user", "Hi", None), ("assistant", "Yo", None)]


@pytest.mark.parametrize(
    ("record", "kind"),
    [
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            "bad_role_order",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
            "empty_content",
        ),
        ({"messages": [{"content": "a"}]}, "missing_field"),
        ({"messages": [{"role": "user", "content": {"x": 1}}]}, "wrong_type"),
        ({"instruction": "a"}, "missing_field"),
    ],
)
def test_bad_records(record: dict, kind: str) -> None:
    fmt = "alpaca" if "instruction" in record else "messages"
    with pytest.raises(RecordError) as err:
        _convert(record, fmt)
    assert err.value.kind == kind


def test_undetectable_format_says_what_to_do() -> None:
    with pytest.raises(
        SftError, match=r"cannot detect the data format from fields \['foo'\].*columns:"
    ):
        detect_format(get_plugins(), {"foo": 1}, "x:1")
