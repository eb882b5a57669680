"""Record accounting: every record ends trained, dropped (reason) or rejected (file:line, reason);
the totals add up; rejects.jsonl and data.json land in the run directory; the length policy and
`on_bad_record` / `max_drop_fraction` stop a run with a message that says where and what to do.

    .venvs/torch/bin/python -m pytest tests/core/data/test_accounting.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sft.data.cache import IGNORE_INDEX
from sft.data.pipeline import prepare_data
from sft.errors import SftError

from tests.core.data.conftest import chat, load_tok, make_config, resolved

LONG = "The quick brown fox jumps over the lazy dog. " * 20


def mixed_file(path: Path) -> Path:
    """Good, malformed, over-long, empty-assistant and otherwise bad records, one per line."""
    good = chat("Hi", "Hello!")
    lines: list[bytes] = [
        json.dumps(good).encode(),  # 1 trained
        b'{"messages": [',  # 2 rejected: malformed_json
        json.dumps(chat(LONG, "ok")).encode(),  # 3 dropped: too_long
        json.dumps(chat("Hi", "")).encode(),  # 4 rejected: empty_content
        b"",  # 5 blank: not a record
        b'{"messages": "\xff\xfe"}',  # 6 rejected: invalid_utf8
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),  # 7 unknown_role
        json.dumps({"messages": [{"role": "assistant", "content": "x"}]}).encode(),  # 8 bad order
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "x", "train": False},
                ]
            }
        ).encode(),
        # 9 dropped: no_trained_tokens
        json.dumps({"msgs": []}).encode(),  # 10 rejected: missing_field
        json.dumps(chat("What is 2+2?", "4", "And 3+3?", "6", system="Be brief.")).encode(),  # 11
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_mixed_file_exact_counts_and_rejects(tiny_tokenizer: Path, tmp_path: Path, capsys) -> None:
    src = mixed_file(tmp_path / "mixed.jsonl")
    cfg = make_config(
        tmp_path, {"train": {"path": str(src), "format": "messages"}, "max_seq_len": 128}
    )
    data = prepare_data(cfg, resolved(tiny_tokenizer), run_dir=tmp_path / "run")
    acc = data.stats["train"]
    assert acc == {
        "records": 10,
        "trained": 2,
        "samples": 2,
        "truncated": 0,
        "split": 0,
        "dropped": {"no_trained_tokens": 1, "too_long": 1},
        "rejected": {
            "bad_role_order": 1,
            "empty_content": 1,
            "invalid_utf8": 1,
            "malformed_json": 1,
            "missing_field": 1,
            "unknown_role": 1,
        },
    }
    rejects = [
        json.loads(line) for line in (tmp_path / "run/rejects.jsonl").read_text().splitlines()
    ]
    assert [(r["where"], r["reason"]) for r in rejects] == [
        (f"{src}:2", "malformed_json"),
        (f"{src}:4", "empty_content"),
        (f"{src}:6", "invalid_utf8"),
        (f"{src}:7", "unknown_role"),
        (f"{src}:8", "bad_role_order"),
        (f"{src}:10", "missing_field"),
    ]
    report = json.loads((tmp_path / "run/data.json").read_text())
    assert report["train"] == acc and report["key"] == data.key
    assert data.train.sources == [f"{src}:1", f"{src}:11"]
    out = capsys.readouterr().out
    assert (
        "data: 10 records -> 2 trained, 2 dropped (no_trained_tokens 1, too_long 1), 6 rejected"
        in out
    )


def test_bad_record_stops_with_file_and_line(tiny_tokenizer: Path, tmp_path: Path) -> None:
    src = mixed_file(tmp_path / "mixed.jsonl")
    cfg = make_config(tmp_path, {"train": str(src), "on_bad_record": "error"})
    with pytest.raises(
        SftError, match=rf"{src}:2: bad record \(malformed_json\).*on_bad_record: skip"
    ):
        prepare_data(cfg, resolved(tiny_tokenizer))


def test_too_many_drops_stop_before_training(tiny_tokenizer: Path, tmp_path: Path) -> None:
    src = mixed_file(tmp_path / "mixed.jsonl")
    cfg = make_config(tmp_path, {"train": str(src), "max_seq_len": 128, "max_drop_fraction": 0.5})
    with pytest.raises(SftError, match=r"80.0% of the training records.*max_drop_fraction 50.0%"):
        prepare_data(cfg, resolved(tiny_tokenizer), run_dir=tmp_path / "run")
    assert (tmp_path / "run/rejects.jsonl").is_file()  # written first, so the user can look


def test_length_policy_error_names_the_record(tiny_tokenizer: Path, tmp_path: Path) -> None:
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps(chat("Hi", "Yes")) + "\n" + json.dumps(chat(LONG, "ok")) + "\n")
    cfg = make_config(tmp_path, {"train": str(src), "max_seq_len": 64, "length_policy": "error"})
    with pytest.raises(SftError, match=rf"{src}:2: sample has \d+ tokens > data.max_seq_len 64"):
        prepare_data(cfg, resolved(tiny_tokenizer))


def test_truncate_keeps_the_start_and_counts_it(tiny_tokenizer: Path, tmp_path: Path) -> None:
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps(chat("Hi", LONG)) + "\n" + json.dumps(chat(LONG, "ok")) + "\n")
    cfg = make_config(tmp_path, {"train": str(src), "max_seq_len": 64, "length_policy": "truncate"})
    data = prepare_data(cfg, resolved(tiny_tokenizer))
    acc = data.stats["train"]
    # The long answer is cut but still trains; the long prompt leaves nothing to train on.
    assert (acc["trained"], acc["truncated"], acc["dropped"]) == (1, 1, {"no_trained_tokens": 1})
    ids, labels = data.train.sample(0)
    assert len(ids) == 64 and (labels != IGNORE_INDEX).sum() > 0


def test_split_cuts_text_into_windows(tiny_tokenizer: Path, tmp_path: Path) -> None:
    src = tmp_path / "t.jsonl"
    src.write_text(json.dumps({"text": LONG}) + "\n")
    cfg = make_config(tmp_path, {"train": str(src), "max_seq_len": 16, "length_policy": "split"})
    data = prepare_data(cfg, resolved(tiny_tokenizer))
    tok = load_tok(tiny_tokenizer)
    whole = tok(LONG + tok.eos_token, add_special_tokens=False).input_ids
    pieces = [data.train.sample(i)[0].tolist() for i in range(len(data.train))]
    assert all(len(p) <= 16 for p in pieces)
    # Every piece trains all its tokens; a last piece of one token has nothing to predict.
    kept = [t for p in pieces for t in p]
    assert kept == whole[: len(kept)] and len(whole) - len(kept) in (0, 1)
    assert data.stats["train"]["split"] == 1 and data.stats["train"]["trained"] == 1


def test_split_refuses_conversations(tiny_tokenizer: Path, tmp_path: Path) -> None:
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps(chat(LONG, "ok")) + "\n")
    cfg = make_config(tmp_path, {"train": str(src), "max_seq_len": 32, "length_policy": "split"})
    with pytest.raises(SftError, match="split only applies to the text format"):
        prepare_data(cfg, resolved(tiny_tokenizer))


def test_summary_line_reads_as_documented() -> None:
    """The one line a user reads before training (and in the "no training samples left"
    error), literally. (`make mutate` found it unchecked.)"""
    from sft.data.accounting import summary_line

    acc = {
        "records": 9,
        "trained": 5,
        "truncated": 2,
        "split": 0,
        "dropped": {"too_long": 1},
        "rejected": {"malformed_json": 2, "empty_content": 1},
        "samples": 6,
    }
    assert summary_line(acc, "train") == (
        "train: 9 records -> 5 trained (2 truncated), 1 dropped (too_long 1), "
        "3 rejected (malformed_json 2, empty_content 1); 6 samples"
    )
    acc = {"records": 4, "trained": 4, "truncated": 1, "split": 3, "dropped": {}, "rejected": {}}
    assert summary_line({**acc, "samples": 7}) == (
        "data: 4 records -> 4 trained (1 truncated, 3 split), 0 dropped, 0 rejected; 7 samples"
    )


def test_accounting_counts_each_outcome_and_stops_on_error(tmp_path: Path) -> None:
    """The counters themselves, without the pipeline around them."""
    from sft.data.accounting import Accounting
    from sft.data.conversation import RecordError

    acc = Accounting(on_bad_record="skip")
    acc.keep(pieces=1, truncated=False)
    acc.keep(pieces=3, truncated=False)  # split into 3 samples
    acc.keep(pieces=1, truncated=True)
    acc.drop("a.jsonl:4", "too_long")
    acc.drop("a.jsonl:5", "too_long")
    acc.drop("a.jsonl:6", "no_trained_tokens")
    acc.reject("a.jsonl:7", RecordError("malformed_json", "line 1 col 3"))
    acc.reject("a.jsonl:8", RecordError("malformed_json"))
    assert acc.as_dict() == {
        "records": 8,
        "trained": 3,
        "samples": 5,
        "truncated": 1,
        "split": 1,
        "dropped": {"no_trained_tokens": 1, "too_long": 2},
        "rejected": {"malformed_json": 2},
    }
    acc.write_rejects(tmp_path / "rejects.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert lines == [
        {"where": "a.jsonl:7", "reason": "malformed_json", "detail": "line 1 col 3"},
        {"where": "a.jsonl:8", "reason": "malformed_json", "detail": "malformed_json"},
    ]
    strict = Accounting()  # on_bad_record: error is the default
    with pytest.raises(SftError) as err:
        strict.reject("b.jsonl:2", RecordError("unknown_role", "role 'wizard'"))
    assert str(err.value) == (
        "b.jsonl:2: bad record (unknown_role): role 'wizard'. Fix the record, or set "
        "data.on_bad_record: skip to count and skip bad records (written to rejects.jsonl)"
    )
    assert strict.records == 0
    acc.records += 1  # a record counted but never classified is an accounting bug
    with pytest.raises(AssertionError, match="accounting bug: 8 != 9"):
        acc.as_dict()
