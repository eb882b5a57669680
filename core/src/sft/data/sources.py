"""Reading raw records from files: jsonl, json arrays, parquet, csv, arrow, globs and HF
`save_to_disk` directories, streamed, each record tagged with where it came from; and from
dataset repos (a hub id `org/name`, or a local directory laid out like one), streamed by
`datasets.load_dataset(..., streaming=True)`.

    for rec in read_source(DataSource(path="data/*.jsonl", max_samples=100)):
        rec.where      # "data/a.jsonl:12" (1-based line; `file:row` for columnar files)
        rec.data       # the record as a dict (columns already renamed), or None when bad
        rec.error      # RecordError for malformed JSON / invalid UTF-8 / not an object

pyarrow reads parquet and arrow (the `datasets` library is needed only for dataset repos). A
bad record is yielded, not raised, so the caller decides between `on_bad_record: error` and `skip`.
Nothing is read whole: jsonl line by line, parquet in batches of 1024 rows, arrow memory-mapped,
dataset repos as an IterableDataset.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.data.conversation import RecordError
from sft.errors import SftError
from sft.specs import DataSource

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")
DATASETS_INSTALL = "pip install datasets"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(path: str) -> bool:
    """`org/name` that is no local file, directory or glob: a Hugging Face dataset repo id."""
    return (
        bool(_HUB_ID.match(path))
        and not path.endswith(SUFFIXES)
        and not os.path.exists(path)
        and not glob.has_magic(path)
    )


def is_dataset_repo(src: DataSource) -> bool:
    """Read with `datasets.load_dataset`: a hub id, or a local directory that is a dataset repo
    (it has a dataset card README.md, the source names a split or subset, or its file names
    hold more splits than train, as in `data/train-00000-of-00001.parquet` beside
    `data/test-...`) and not a `save_to_disk` directory."""
    if looks_like_hub_id(src.path):
        return True
    d = Path(src.path)
    if not d.is_dir() or (d / "state.json").is_file() or (d / "dataset_dict.json").is_file():
        return False
    card = (d / "README.md").is_file()
    return card or src.split is not None or src.subset is not None or _named_splits(d)


def _named_splits(d: Path) -> bool:
    """The directory's file names name splits besides train (datasets' own conventions,
    `get_data_patterns`), so reading every file would train on the test split too. Without the
    `datasets` library a directory is read as plain files."""
    try:
        from datasets.data_files import get_data_patterns
    except ImportError:
        return False
    try:
        splits = get_data_patterns(str(d))
    except Exception:  # EmptyDatasetError and the like: no data files datasets would read
        return False
    return any(str(name) != "train" for name in splits)


def read_dataset_repo(src: DataSource) -> Iterator[RawRecord]:
    """Records of one split of a dataset repo, streamed (`where` is `repo[split]:row`)."""
    try:
        import datasets
    except ImportError:
        raise SftError(
            f"data source {src.path} is a dataset repo, read with the `datasets` library, which "
            f"is not installed; install it with: {DATASETS_INSTALL}"
        ) from None
    split = src.split or "train"
    try:
        ds = datasets.load_dataset(
            src.path, name=src.subset, split=split, revision=src.revision, streaming=True
        )
        rows = iter(ds)
        first = next(rows, None)
    except Exception as exc:  # datasets raises many kinds; all mean "cannot load"
        where = "a local dataset directory" if os.path.isdir(src.path) else "a hub dataset id"
        raise SftError(
            f"data source {src.path} ({where}): datasets.load_dataset(split={split!r}, "
            f"subset={src.subset!r}, revision={src.revision!r}) failed: "
            f"{type(exc).__name__}: {exc}. Check the id, split and subset (and that you are "
            "online for a hub id), or give a local file"
        ) from None
    if first is None:
        return
    yield RawRecord(f"{src.path}[{split}]:1", dict(first))
    for i, rec in enumerate(rows, 2):
        yield RawRecord(f"{src.path}[{split}]:{i}", dict(rec))


def source_fingerprint(src: DataSource) -> str:
    """Hash of what a source reads: its files' bytes, or for a hub id the repo's commit."""
    if looks_like_hub_id(src.path):
        try:
            from huggingface_hub import HfApi

            sha = HfApi().dataset_info(src.path, revision=src.revision).sha
        except Exception as exc:  # offline, unknown repo, no access
            raise SftError(
                f"data source {src.path}: cannot look up this hub dataset ({exc}); "
                "a hub id needs the network (or download it and give the local directory)"
            ) from None
        return hashlib.sha256(f"{src.path}@{sha}".encode()).hexdigest()
    return fingerprint(source_files(src.path, every_file=is_dataset_repo(src)))


@dataclass
class RawRecord:
    where: str
    data: dict[str, Any] | None
    error: RecordError | None = None
    raw: str | None = None
    """A JSON line not parsed yet (`read_source(..., parse=False)`); see `parsed()`."""

    def parsed(self, columns: dict[str, str] | None = None) -> RawRecord:
        """This record with its JSON line parsed and columns renamed (if it was deferred)."""
        if self.raw is None:
            return self
        rec = _parse(self.raw, self.where)
        if rec.data is not None and columns:
            rec.data = rename_columns(rec.data, columns)
        return rec


def source_files(path: str, every_file: bool = False) -> list[Path]:
    """The files a source path names: a file, a glob, or a directory (save_to_disk or files;
    `every_file`: all of a dataset repo directory, its card and configs too). A hub id names
    none here."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir() and every_file:
        return sorted(f for f in p.rglob("*") if f.is_file() and ".cache" not in f.parts)
    if p.is_dir():
        return _dir_files(p)
    if looks_like_hub_id(path):
        return []
    if any(c in path for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file())
        if files:
            return files
    raise SftError(f"data source {path}: no such file, directory or matching glob")


def _dir_files(d: Path) -> list[Path]:
    if (d / "dataset_dict.json").is_file():
        splits = json.loads((d / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise SftError(
                f"{d} is a DatasetDict with splits {splits}; point data.train at one split "
                f"directory, e.g. {d / (splits[0] if splits else 'train')}"
            )
        d = d / "train"
    state = d / "state.json"
    if state.is_file():  # HF datasets save_to_disk: arrow shards listed in state.json
        return [d / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
    if not files:
        raise SftError(f"data directory {d} holds no {'/'.join(SUFFIXES)} files")
    return files


def fingerprint(files: list[Path]) -> str:
    """Hash of the files' bytes (for the cache key)."""
    h = hashlib.sha256()
    for f in files:
        h.update(str(f).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 16), b""):
                h.update(block)
    return h.hexdigest()


def read_source(src: DataSource, parse: bool = True) -> Iterator[RawRecord]:
    """Records of one source, in file order, at most `src.max_samples`, columns renamed.
    `parse=False` leaves JSON lines unparsed (`rec.raw`) for a worker process to parse."""
    records = (
        read_dataset_repo(src)
        if is_dataset_repo(src)
        else (rec for f in source_files(src.path) for rec in read_file(f, parse))
    )
    for n, rec in enumerate(records, 1):
        if rec.data is not None and src.columns:
            rec.data = rename_columns(rec.data, src.columns)
        yield rec
        if src.max_samples is not None and n >= src.max_samples:
            return


def rename_columns(data: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """`columns` maps the format's field name to the user's column name."""
    out = dict(data)
    for field, column in columns.items():
        if column in out:
            out[field] = out.pop(column)
    return out


def read_file(path: Path, parse: bool = True) -> Iterator[RawRecord]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path, parse)
    if suffix == ".json":
        return read_json(path)
    if suffix == ".parquet":
        return read_parquet(path)
    if suffix == ".csv":
        return read_csv(path)
    if suffix == ".arrow":
        return read_arrow(path)
    raise SftError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")


def _parse(text: str, where: str) -> RawRecord:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return RawRecord(where, None, RecordError("malformed_json", f"malformed JSON: {exc}"))
    except RecursionError:  # e.g. 50k nested brackets
        return RawRecord(where, None, RecordError("malformed_json", "JSON nested too deeply"))
    if not isinstance(obj, dict):
        kind = type(obj).__name__
        return RawRecord(
            where, None, RecordError("wrong_type", f"expected a JSON object, got {kind}")
        )
    return RawRecord(where, obj)


def read_jsonl(path: Path, parse: bool = True) -> Iterator[RawRecord]:
    """One JSON object per line; 1-based line numbers; blank lines are skipped."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRecord(where, None, RecordError("invalid_utf8", f"invalid UTF-8: {exc}"))
                continue
            if line.strip():
                yield _parse(line, where) if parse else RawRecord(where, None, raw=line)


def read_json(path: Path) -> Iterator[RawRecord]:
    """A JSON array of objects (line numbers are where each object starts), or JSON lines."""
    raw = path.read_bytes()
    if not raw.lstrip().startswith(b"["):
        yield from read_jsonl(path)  # JSON lines: a bad byte costs one counted line, not the file
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:  # the array's records cannot be separated: not skippable
        raise SftError(
            f"{path}: invalid UTF-8 at byte {exc.start} of a JSON array; save the "
            "file as UTF-8 (or as JSON lines, where a bad line is one skipped record)"
        ) from None
    start = len(text) - len(text.lstrip())
    if not text[start:].startswith("["):
        yield from read_jsonl(path)  # many ".json" files are really JSON lines
        return
    yield from _json_array(text, start + 1, path)


def _json_array(text: str, pos: int, path: Path) -> Iterator[RawRecord]:
    # Decode element by element so each record knows its line and one bad element is one
    # bad record, not a failed file.
    dec = json.JSONDecoder()
    line, seen = 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        line += text.count("\n", seen, pos)
        seen = pos
        where = f"{path}:{line}"
        try:
            obj, pos = dec.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError) as exc:
            # Not a countable reject: the records after it cannot be located, so skipping would
            # silently lose an unknown number of them (tests/reliability/test_data_fuzz.py).
            reason = "JSON nested too deeply" if isinstance(exc, RecursionError) else exc
            raise SftError(
                f"{where}: malformed JSON inside a JSON array ({reason}); the records after it "
                "cannot be read, so none of this file is used. Fix the file, or convert it to "
                "JSON lines (one record per line), where a bad line is one skippable record"
            ) from None
        if isinstance(obj, dict):
            yield RawRecord(where, obj)
        else:
            err = RecordError("wrong_type", f"expected a JSON object, got {type(obj).__name__}")
            yield RawRecord(where, None, err)


def read_csv(path: Path) -> Iterator[RawRecord]:
    """A header row, then records; `where` is the line each record starts on. A row with
    invalid UTF-8 is one rejected record; the rows after it are still read (surrogateescape
    keeps the bad bytes in the row instead of failing the whole buffered read)."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh)
        start = 2
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            data = {k: v for k, v in row.items() if k is not None}
            if not all(_utf8(x) for kv in data.items() for x in kv):
                yield RawRecord(where, None, RecordError("invalid_utf8", "invalid UTF-8 bytes"))
                continue
            yield RawRecord(where, data)


def _utf8(value: Any) -> bool:
    if not isinstance(value, str):
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # an escaped byte that was not UTF-8
        return False
    return True


def _table_rows(batches: Any, path: Path) -> Iterator[RawRecord]:
    row = 0
    for batch in batches:
        for rec in batch.to_pylist():
            row += 1
            yield RawRecord(f"{path}:{row}", rec)


def _columnar(path: Path, kind: str, rows: Iterator[RawRecord]) -> Iterator[RawRecord]:
    # A corrupt or truncated file is one clear error naming it, not a pyarrow traceback
    # (tests/reliability): its remaining records cannot be read, so it must not be skipped.
    import pyarrow as pa

    try:
        yield from rows
    except (pa.ArrowException, OSError) as exc:
        raise SftError(f"{path}: cannot read it as {kind} ({exc}); is the file complete?") from None


def read_parquet(path: Path) -> Iterator[RawRecord]:
    return _columnar(path, "parquet", _parquet_rows(path))


def _parquet_rows(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    yield from _table_rows(pq.ParquetFile(path).iter_batches(batch_size=1024), path)


def read_arrow(path: Path) -> Iterator[RawRecord]:
    """Arrow IPC stream (what `datasets` writes) or IPC file."""
    return _columnar(path, "Arrow IPC", _arrow_rows(path))


def _arrow_rows(path: Path) -> Iterator[RawRecord]:
    import pyarrow as pa

    with pa.memory_map(str(path), "r") as mm:
        try:
            reader: Any = pa.ipc.open_stream(mm)
            batches: Any = iter(reader)
        except pa.ArrowInvalid:
            mm.seek(0)
            f = pa.ipc.open_file(mm)
            batches = (f.get_batch(i) for i in range(f.num_record_batches))
        yield from _table_rows(batches, path)
