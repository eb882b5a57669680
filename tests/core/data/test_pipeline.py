"""`prepare_data` end to end on the tiny tokenizer: the content-hashed cache (reuse, key,
concurrent builders), the saved tokenizer, eos ids, eval split, mixing weights, stats, and the
`sft data` commands.

    .venvs/torch/bin/python -m pytest tests/core/data/test_pipeline.py -q
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import sft.data.pipeline as pipeline
from sft.data.cache import PreparedData
from sft.data.pipeline import prepare_data

from tests.core.data.conftest import chat, load_tok, make_config, resolved, write_jsonl

ANSWERS = [
    "Paris.",
    "Guten Morgen.",
    "Waves fold into foam.",
    "On Tuesday.",
    "Hello!",
    "4",
    "Yes.",
    "No.",
]


def chats(path: Path, n: int = 8, tag: str = "") -> Path:
    return write_jsonl(
        path, [chat(f"Question {tag}{i}?", ANSWERS[i % len(ANSWERS)]) for i in range(n)]
    )


def test_cache_is_reused_and_keyed_on_content(
    tiny_tokenizer: Path, tmp_path: Path, monkeypatch
) -> None:
    src = chats(tmp_path / "d.jsonl")
    cfg = make_config(tmp_path, {"train": str(src)})
    first = prepare_data(cfg, resolved(tiny_tokenizer))
    assert first.cache_dir.parent == Path(pipeline.cache_root()) / "data"

    def no_build(*a: object, **k: object) -> None:
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(pipeline, "build", no_build)
    again = prepare_data(cfg, resolved(tiny_tokenizer))
    assert again.cache_dir == first.cache_dir
    assert np.array_equal(again.train.input_ids, first.train.input_ids)
    monkeypatch.undo()
    # Any change to data bytes or policy is a new key.
    keys = {first.key}
    keys.add(
        prepare_data(
            make_config(tmp_path, {"train": str(src), "max_seq_len": 512}), resolved(tiny_tokenizer)
        ).key
    )
    keys.add(
        prepare_data(
            make_config(tmp_path, {"train": str(src), "mask": "all"}), resolved(tiny_tokenizer)
        ).key
    )
    chats(src, tag="x")
    keys.add(prepare_data(cfg, resolved(tiny_tokenizer)).key)
    assert len(keys) == 4


def test_concurrent_preparers_build_once(tiny_tokenizer: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = make_config(
        tmp_path, {"train": str(chats(tmp_path / "d.jsonl")), "cache_dir": str(tmp_path / "c")}
    )
    real, calls = pipeline.build, []
    monkeypatch.setattr(pipeline, "build", lambda *a, **k: (calls.append(1), real(*a, **k)))
    out: list[PreparedData] = []
    threads = [
        threading.Thread(target=lambda: out.append(prepare_data(cfg, resolved(tiny_tokenizer))))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(out) == 3 and len({d.cache_dir for d in out}) == 1
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(".tmp")] == []


def test_tokenizer_dir_eos_ids_and_stats(tiny_tokenizer: Path, tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path,
        {"train": str(chats(tmp_path / "d.jsonl")), "template": "llama3", "max_seq_len": 128},
    )
    data = prepare_data(cfg, resolved(tiny_tokenizer))
    tok = load_tok(data.tokenizer_dir)
    assert tok.chat_template == pipeline.get_plugins().templates.get("llama3").source
    assert Path(data.tokenizer_dir).parent == data.cache_dir
    # Loadable by transformers 4.57 (MindSpore venv) too: no 5.x-only tokenizer class name.
    saved = json.loads((Path(data.tokenizer_dir) / "tokenizer_config.json").read_text())
    assert saved.get("tokenizer_class") != "TokenizersBackend"
    # llama3's <|eot_id|> is plain text for the tiny tokenizer: only its eos <|im_end|> (2) ends turns.
    assert data.eos_ids == [2] and data.pad_id == 0
    s = data.stats
    assert s["samples"] == 8 and s["tokens"] == int(data.train.lengths.sum())
    assert s["trained_tokens"] == data.train.trained_tokens()
    assert 0 < s["trained_fraction"] < 1 and 0 < s["packing"]["efficiency"] <= 1
    assert s["length"]["min"] <= s["length"]["p50"] <= s["length"]["max"] <= 128


def test_eos_ids_for_chatml_tokenizer(tiny_tokenizer: Path, tmp_path: Path) -> None:
    data = prepare_data(
        make_config(tmp_path, {"train": str(chats(tmp_path / "d.jsonl"))}), resolved(tiny_tokenizer)
    )
    assert data.eos_ids == [2]  # <|im_end|>, read off the tokenizer's own template


def test_eval_fraction_is_deterministic_and_disjoint(tiny_tokenizer: Path, tmp_path: Path) -> None:
    src = chats(tmp_path / "d.jsonl", n=20)
    runs = []
    for i in range(2):
        cfg = make_config(
            tmp_path,
            {"train": str(src), "eval_fraction": 0.25, "cache_dir": str(tmp_path / f"c{i}")},
        )
        runs.append(prepare_data(cfg, resolved(tiny_tokenizer)))
    a, b = runs
    assert a.eval is not None and len(a.eval) == 5 and len(a.train) == 15
    assert a.eval.sources == b.eval.sources
    assert not set(a.eval.sources) & set(a.train.sources)
    other = prepare_data(
        make_config(tmp_path, {"train": str(src), "eval_fraction": 0.25}, train={"seed": 7}),
        resolved(tiny_tokenizer),
    )
    assert other.eval.sources != a.eval.sources


def test_eval_sources_are_accounted_separately(tiny_tokenizer: Path, tmp_path: Path) -> None:
    ev = write_jsonl(tmp_path / "eval.jsonl", [chat("Hi", "Hello!"), "{oops"])
    cfg = make_config(tmp_path, {"train": str(chats(tmp_path / "d.jsonl")), "eval": str(ev)})
    data = prepare_data(cfg, resolved(tiny_tokenizer), run_dir=tmp_path / "run")
    assert len(data.eval) == 1 and data.stats["eval"]["rejected"] == {"malformed_json": 1}
    assert (
        json.loads((tmp_path / "run/rejects.jsonl").read_text().splitlines()[0])["where"]
        == f"{ev}:2"
    )


def test_mixing_weights(tiny_tokenizer: Path, tmp_path: Path) -> None:
    a, b = chats(tmp_path / "a.jsonl", n=4, tag="a"), chats(tmp_path / "b.jsonl", n=4, tag="b")
    cfg = make_config(
        tmp_path, {"train": [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}]}
    )
    data = prepare_data(cfg, resolved(tiny_tokenizer))
    from_a = [s for s in data.train.sources if s.startswith(str(a))]
    assert (
        len(data.train) == 8 and len(from_a) == 6 and len(set(from_a)) == 4
    )  # all of a, 2 repeats
    plain = prepare_data(
        make_config(tmp_path, {"train": [str(a), str(b)]}), resolved(tiny_tokenizer)
    )
    assert len(plain.train) == 8 and len(set(plain.train.sources)) == 8  # no weights: concatenated


@pytest.fixture
def model_dir(tiny_tokenizer: Path, tmp_path: Path) -> Path:
    import shutil

    d = tmp_path / "model"
    shutil.copytree(tiny_tokenizer, d)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


def test_data_commands(model_dir: Path, tmp_path: Path, capsys) -> None:
    import yaml
    from sft.cli import main

    src = write_jsonl(
        tmp_path / "d.jsonl", [chat("Hi", "Hello!"), chat("What is 2+2?", "4"), "{bad"]
    )
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "backend": "example",
                "model": str(model_dir),
                "output_dir": str(tmp_path / "run"),
                "data": {"train": str(src), "on_bad_record": "skip", "max_drop_fraction": 0.5},
            }
        )
    )
    assert main(["data", "prepare", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert (
        "3 records -> 2 trained, 0 dropped, 1 rejected (malformed_json 1)" in out
        and "cache:" in out
    )
    assert main(["data", "stats", "--config", str(cfg), "data.max_seq_len=64"]) == 0
    out = capsys.readouterr().out
    assert "rejected: malformed_json" in out and "packing:" in out and "efficiency" in out
    assert main(["data", "inspect", "--config", str(cfg), "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "sample 0" in out and "Hello!" in out and f"{src}:1" in out
    assert main(["data", "prepare", "--config", str(cfg), "--format", "nosuch"]) == 1
    assert "no installed plugin writes data format 'nosuch'" in capsys.readouterr().err
    assert (tmp_path / "run/data.json").is_file() and (tmp_path / "run/rejects.jsonl").is_file()


def test_worker_processes_give_identical_results(
    tiny_tokenizer: Path, tmp_path: Path, monkeypatch
) -> None:
    from sft.data import workers as workers_mod

    from tests.core.data.test_accounting import mixed_file

    pools: list[int] = []  # processes each pool really started (0: encoded in this process)
    real_init = workers_mod.EncodePool.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        pools.append(len(self._pool._pool) if self._pool is not None else 0)

    monkeypatch.setattr(workers_mod.EncodePool, "__init__", spy)
    src = tmp_path / "d.jsonl"
    mixed = mixed_file(tmp_path / "mixed.jsonl").read_bytes()
    src.write_bytes(mixed + chats(tmp_path / "c.jsonl", n=600).read_bytes() + mixed)
    runs = []
    for workers in ("1", "2"):
        monkeypatch.setenv("SFT_DATA_WORKERS", workers)
        cfg = make_config(
            tmp_path, {"train": str(src), "max_seq_len": 128, "cache_dir": str(tmp_path / workers)}
        )
        runs.append(prepare_data(cfg, resolved(tiny_tokenizer), run_dir=tmp_path / f"run{workers}"))
    one, two = runs
    assert pools == [0, 2]  # the second build really ran in two (spawned) worker processes
    assert one.key == two.key and one.stats == two.stats and one.stats["train"]["records"] == 620
    assert np.array_equal(one.train.input_ids, two.train.input_ids)
    assert (
        np.array_equal(one.train.labels, two.train.labels)
        and one.train.sources == two.train.sources
    )
    assert (tmp_path / "run1/rejects.jsonl").read_text() == (
        tmp_path / "run2/rejects.jsonl"
    ).read_text()


def test_resolved_config_reproduces_the_data_key(tiny_tokenizer: Path, tmp_path: Path) -> None:
    # RUN/config.yaml (defaults filled in) must tokenize to the same cache as the original spec,
    # or rerunning / resuming from it would re-tokenize and refuse the resume.
    from sft.run import config_to_dict
    from sft.specs import RunConfig

    a, b = chats(tmp_path / "a.jsonl", n=4, tag="a"), chats(tmp_path / "b.jsonl", n=4, tag="b")
    for train in ([str(a), str(b)], [{"path": str(a), "weight": 2}, str(b)]):
        cfg = make_config(tmp_path, {"train": train})
        again = RunConfig.model_validate(config_to_dict(cfg))
        first = prepare_data(cfg, resolved(tiny_tokenizer))
        second = prepare_data(again, resolved(tiny_tokenizer))
        assert first.key == second.key and first.train.sources == second.train.sources


def _broken_worker_encoder():
    raise OSError("tokenizer.json vanished")


def test_a_worker_that_cannot_start_is_an_error_not_a_hang() -> None:
    from sft.data.workers import EncodePool

    with EncodePool(None, None, workers=2, init=(_broken_worker_encoder, ())) as pool:  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="data worker could not start: OSError: tokenizer"):
            list(pool.map([(None, None, [])]))
