"""No silent data loss, end to end through `sft run` (the framework-free example backend, so
it runs in every venv): every record is trained, dropped with a reason or rejected with its
file:line; the totals reach summary.json; `data.max_drop_fraction` stops the run before
training; `on_bad_record: error` names the first bad record.

    $ .venvs/core/bin/python -m pytest tests/reliability/test_accounting_e2e.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from sft.cli import main


def chat(q: str, a: str) -> str:
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return json.dumps({"messages": msgs})


LINES = [chat(f"question {i}", f"answer {i}") for i in range(20)]
BAD = {
    4: '{"messages": [{"role": "user", "content": "cut',  # malformed JSON
    9: json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),  # unknown role
    13: chat("empty answer", ""),  # empty content
    17: chat("long " * 400, "answer"),  # longer than max_seq_len: dropped
}


@pytest.fixture
def job(tmp_path: Path, tiny_llama: Path) -> Path:
    lines = [BAD.get(i, line) for i, line in enumerate(LINES)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    spec = {
        "backend": "example",
        "model": str(tiny_llama),
        "data": {
            "train": "train.jsonl",
            "max_seq_len": 128,
            "on_bad_record": "skip",
            "max_drop_fraction": 0.5,
        },
        "logging": {"plot": False, "progress": False},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_every_record_is_accounted_for_in_summary_json(job: Path) -> None:
    assert main(["run", "--config", str(job)]) == 0
    run = job.parent / "run"
    acc = json.loads((run / "summary.json").read_text())["data"]["train"]
    assert acc["records"] == len(LINES)
    assert acc["trained"] == len(LINES) - len(BAD)
    assert acc["dropped"] == {"too_long": 1}
    assert acc["rejected"] == {"empty_content": 1, "malformed_json": 1, "unknown_role": 1}
    rejects = [json.loads(x) for x in (run / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["where"].rsplit(":", 1)[1] for r in rejects) == ["10", "14", "5"]
    assert (run / "data.json").is_file()


def test_too_much_lost_data_stops_before_training(job: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["run", "--config", str(job), "data.max_drop_fraction=0.1"])
    err = capsys.readouterr().err
    assert code == 1 and "20.0% of the training records were dropped or rejected" in err, err
    assert "max_drop_fraction" in err and "Traceback" not in err
    run = job.parent / "run"
    assert not (run / "metrics.jsonl").exists() and not (run / "summary.json").exists()
    assert len((run / "rejects.jsonl").read_text().splitlines()) == 3  # to see what was lost


def test_on_bad_record_error_names_the_first_bad_record(
    job: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["run", "--config", str(job), "data.on_bad_record=error"])
    err = capsys.readouterr().err
    assert code == 1 and "train.jsonl:5: bad record (malformed_json)" in err, err
    assert not (job.parent / "run" / "metrics.jsonl").exists()
