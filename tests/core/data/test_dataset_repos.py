"""Dataset repos as data sources: a directory laid out like a Hugging Face dataset repo (a
dataset card with `configs:`, split files under data/) read through `datasets.load_dataset`
streaming, the same code path as a hub id, offline; split, subset and revision where they apply.

    $ .venvs/torch/bin/python -m pytest tests/core/data/test_dataset_repos.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from sft.config import load_config
from sft.data.pipeline import prepare_data
from sft.data.sources import is_dataset_repo, looks_like_hub_id, read_source
from sft.errors import ConfigError, SftError
from sft.specs import DataSource

from tests.core.data.conftest import chat, make_config, resolved, write_jsonl

CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test-*.parquet
- config_name: alpaca
  data_files:
  - split: train
    path: alpaca/train-*.parquet
---
# A tiny dataset laid out like a hub dataset repo
"""


def make_repo(root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = root / "tiny-chat"
    (repo / "data").mkdir(parents=True)
    (repo / "alpaca").mkdir()
    (repo / "README.md").write_text(CARD)
    for split, n in (("train", 6), ("test", 2)):
        rows = [chat(f"{split} question {i}?", f"{split} answer {i}.") for i in range(n)]
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, repo / "data" / f"{split}-00000-of-00001.parquet")
    alpaca = [{"instruction": f"Say {i}", "output": f"{i}"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(alpaca), repo / "alpaca" / "train-00000-of-00001.parquet")
    return repo


@pytest.fixture
def repo(tmp_path):
    pytest.importorskip("datasets")
    return make_repo(tmp_path)


def _questions(src: DataSource) -> list[str]:
    return [r.data["messages"][0]["content"] for r in read_source(src)]


def test_a_local_dataset_repo_is_read_by_split_and_subset(repo):
    assert is_dataset_repo(DataSource(path=str(repo)))
    train = _questions(DataSource(path=str(repo)))
    assert train == [f"train question {i}?" for i in range(6)]  # not the test split's files
    assert _questions(DataSource(path=str(repo), split="test")) == [
        "test question 0?",
        "test question 1?",
    ]
    recs = list(read_source(DataSource(path=str(repo), subset="alpaca", max_samples=2)))
    assert [r.data for r in recs] == [
        {"instruction": "Say 0", "output": "0"},
        {"instruction": "Say 1", "output": "1"},
    ]
    assert recs[1].where == f"{repo}[train]:2"


def test_a_dataset_repo_trains_through_the_pipeline(repo, tmp_path, tiny_tokenizer):
    cfg = make_config(
        tmp_path, {"train": {"path": str(repo)}, "eval": {"path": str(repo), "split": "test"}}
    )
    data = prepare_data(cfg, resolved(tiny_tokenizer))
    assert data.stats["train"]["records"] == 6 and data.stats["eval"]["records"] == 2
    # the cache key covers the repo's files: editing the card's split mapping is a new cache
    (repo / "README.md").write_text(CARD.replace("data/train-*", "data/test-*", 1))
    again = prepare_data(cfg, resolved(tiny_tokenizer))
    assert again.key != data.key and again.stats["train"]["records"] == 2


def test_a_directory_whose_file_names_name_splits_is_read_by_split(tmp_path, tiny_tokenizer):
    # No dataset card: the hub's file-name conventions alone say which file is which split
    # (before, every file of the directory was training data, the validation split too).
    pytest.importorskip("datasets")
    d = tmp_path / "named"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [chat(f"train question {i}?", "yes") for i in range(5)])
    write_jsonl(d / "validation.jsonl", [chat(f"held question {i}?", "no") for i in range(3)])
    cfg = make_config(tmp_path, {"train": str(d), "eval": {"path": str(d), "split": "validation"}})
    data = prepare_data(cfg, resolved(tiny_tokenizer))
    assert data.stats["train"]["records"] == 5 and data.stats["eval"]["records"] == 3
    assert is_dataset_repo(DataSource(path=str(d)))
    assert _questions(DataSource(path=str(d))) == [f"train question {i}?" for i in range(5)]
    held = _questions(DataSource(path=str(d), split="validation"))
    assert held == [f"held question {i}?" for i in range(3)]
    # files that name no split besides train stay a plain directory of files
    plain = tmp_path / "plain"
    plain.mkdir()
    write_jsonl(plain / "a.jsonl", [chat("q", "a")])
    write_jsonl(plain / "train.jsonl", [chat("q", "a")])
    assert not is_dataset_repo(DataSource(path=str(plain)))


def test_split_subset_revision_are_refused_where_they_mean_nothing(tmp_path, repo):
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps(chat("q", "a")) + "\n")
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "train": [
                        {"path": "plain.jsonl", "split": "test", "subset": "x"},
                        {"path": "tiny-chat", "revision": "main"},
                    ]
                }
            }
        )
    )
    with pytest.raises(ConfigError) as err:
        load_config(job)
    paths = sorted(p.path for p in err.value.problems if p.path.startswith("data."))
    assert paths == ["data.train[0].split", "data.train[0].subset", "data.train[1].revision"]


def test_an_unknown_split_names_the_source_and_what_to_check(repo):
    with pytest.raises(SftError, match=r"tiny-chat \(a local dataset directory\).*split='dev'"):
        list(read_source(DataSource(path=str(repo), split="dev")))


def test_hub_ids_are_told_apart_from_paths(tmp_path, monkeypatch):
    pytest.importorskip("datasets")  # without it, a hub id is a config error naming the install
    monkeypatch.chdir(tmp_path)
    assert looks_like_hub_id("HuggingFaceH4/ultrachat_200k")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("")
    for path in ("data/train.jsonl", "data", "data/*.jsonl", "a/b.parquet", "./x/y", "plain"):
        assert not looks_like_hub_id(path), path
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump({"backend": "example", "data": {"train": "HuggingFaceH4/no_robots"}})
    )
    cfg = load_config(job)  # validates offline: a hub id is not resolved against the config dir
    assert cfg.data.train[0].path == "HuggingFaceH4/no_robots"
