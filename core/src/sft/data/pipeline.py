"""`prepare_data`: the job spec's data section -> a content-hashed tokenized cache.

    records (sources.py) -> Conversation (formats.py) -> ids + labels (encoder.py)
      -> length policy + accounting (accounting.py) -> eval split, mixing -> cache (cache.py)

The cache lives in `data.cache_dir/<key>` (default `$SFT_CACHE_DIR/data/<key>`); the key covers
the data files' bytes, the tokenizer files, the template source, every data policy, max_seq_len
and PIPELINE_VERSION, so a second `sft run` or `sft data prepare` reuses it. It is built in a
temporary directory and renamed into place under a file lock, so concurrent processes (one per
rank) never both build it nor read a half-written one.

    $ sft data prepare --config configs/smollm2-135m/lora.yaml
    data: 1000 records -> 990 trained, 6 dropped (too_long 6), 4 rejected (malformed_json 4); ...
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sft.data.accounting import Accounting, Sample, apply_length, summary_line
from sft.data.cache import PreparedData, Selection, Spool, TokenizedSplit, write_split
from sft.data.conversation import RecordError
from sft.data.encoder import Encoder
from sft.data.formats import detect_format
from sft.data.sources import is_dataset_repo, read_source, source_files, source_fingerprint
from sft.data.stats import check_drop_fraction, split_stats, write_report
from sft.data.templates import Renderer, resolve_template
from sft.data.tokenizer import end_of_turn_ids, load_tokenizer, pad_id, save_tokenizer
from sft.data.workers import EncodePool, Init, Job, default_workers
from sft.errors import SftError
from sft.paths import cache_root
from sft.plugins import Plugins, get_plugins
from sft.specs import DataSource, DataSpec, RunConfig

PIPELINE_VERSION = "2"  # 2: a span ending in a character split over tokens trains all of them
BATCH = 256  # records per chunk: one batched tokenizer call, one unit of work for a worker
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.txt",
)


def prepare_data(config: RunConfig, model: Any, run_dir: Path | None = None) -> PreparedData:
    """Tokenize (or reuse) the data of `config` for `model` (a ResolvedModel); writes
    RUN_DIR/data.json and rejects.jsonl, prints a one-line summary, and raises SftError when more
    than data.max_drop_fraction of the records was dropped or rejected."""
    data = load_or_build(config, Path(model.path), trust_remote_code=config.model.trust_remote_code)
    if run_dir is not None and os.environ.get("RANK", "0") == "0" and not config.parallel.node_rank:
        write_report(data, Path(run_dir))
        print(summary_line(data.stats["train"]), flush=True)
    check_drop_fraction(data.stats, config.data.max_drop_fraction)
    return data


def load_or_build(
    config: RunConfig, tokenizer_path: Path, trust_remote_code: bool = False
) -> PreparedData:
    """The cache for this config and tokenizer, built once under a lock."""
    plugins = get_plugins()
    key = cache_key(config, tokenizer_path, plugins)
    root = Path(config.data.cache_dir) if config.data.cache_dir else cache_root() / "data"
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    with _file_lock(root / f"{key}.lock"):
        if not (final / "meta.json").is_file():
            tmp = root / f".tmp-{key}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                build(config, tokenizer_path, trust_remote_code, plugins, tmp, final, key)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return PreparedData.load(final)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cache_key(config: RunConfig, tokenizer_path: Path, plugins: Plugins) -> str:
    """Hash of everything that changes the tokens: data bytes, tokenizer files, template,
    policies, max_seq_len, seed (eval split, mixing) and the pipeline version."""
    d = config.data
    h = hashlib.sha256(f"sft-data-v{PIPELINE_VERSION}".encode())
    policy = d.model_dump(
        mode="json",
        exclude={
            "train",
            "eval",
            "cache_dir",
            "max_drop_fraction",
            "packing",
            "group_by_length",
            "shuffle",
        },
    )
    h.update(json.dumps([policy, config.train.seed], sort_keys=True).encode())
    for split, srcs in (("train", d.train), ("eval", d.eval or [])):
        for src in srcs:
            # repo fields only when given, so caches made before they existed keep their keys
            unset = {k for k in ("split", "subset", "revision") if getattr(src, k) is None}
            spec = src.model_dump(mode="json", exclude=unset)
            h.update(json.dumps([split, spec], sort_keys=True).encode())
            h.update(source_fingerprint(src).encode())
    for name in TOKENIZER_FILES:
        f = tokenizer_path / name
        if f.is_file():
            h.update(name.encode() + hashlib.sha256(f.read_bytes()).digest())
    h.update(_template_source(d.template, plugins).encode())
    return h.hexdigest()[:24]


def _template_source(spec: str, plugins: Plugins) -> str:
    if spec in plugins.templates:
        return plugins.templates.get(spec).source
    if spec != "auto" and Path(spec).is_file():
        return Path(spec).read_text(encoding="utf-8")
    return spec  # auto: the tokenizer files (hashed) hold the template


# ------------------------------------------------------------------------------------- build


def build(
    config: RunConfig,
    tokenizer_path: Path,
    trust_remote_code: bool,
    plugins: Plugins,
    out: Path,
    final: Path,
    key: str,
) -> None:
    """Tokenize every source into `out` (renamed to `final` by the caller)."""
    d = config.data
    tok = load_tokenizer(tokenizer_path, trust_remote_code)
    encoder = make_encoder(tok, d, plugins)
    renderer = encoder.render
    template = renderer.template
    spool_dir = out / "spool"
    acc = Accounting(on_bad_record=d.on_bad_record, rejects_path=out / "rejects.jsonl")
    eval_acc = (
        Accounting(on_bad_record=d.on_bad_record, rejects_path=spool_dir / "eval-rejects.jsonl")
        if d.eval
        else None
    )
    init: Init = (worker_encoder, (str(tokenizer_path), trust_remote_code, d))
    spools = _encode_sources(config, plugins, encoder, init, acc, eval_acc, spool_dir)
    parts = [np.arange(len(s)) for s in spools[: len(d.train)]]
    held: Selection = [
        (len(d.train) + j, np.arange(len(s))) for j, s in enumerate(spools[len(d.train) :])
    ]
    if not d.eval and d.eval_fraction > 0:
        parts, held = _hold_out(spools, parts, d.eval_fraction, config.train.seed)
    train = _mix(parts, d.train, config.train.seed)
    if not sum(len(idx) for _, idx in train):
        first = "; ".join(f"{r['where']}: {r['detail']}" for r in acc.first_rejects)
        raise SftError(
            f"no training samples left: {summary_line(acc.as_dict())}"
            + (f". First rejects: {first}" if first else "")
        )
    _, trained = write_split(out / "train", spools, train)
    n_eval, _ = write_split(out / "eval", spools, held) if held_any(held) else (0, 0)
    tok_dir = out / "tokenizer"
    save_tokenizer(tok, template, tok_dir)
    data = PreparedData(
        cache_dir=out,
        key=key,
        train=TokenizedSplit.load(out / "train"),
        eval=None,
        tokenizer_dir=str(final / "tokenizer"),
        pad_id=pad_id(tok),
        eos_ids=end_of_turn_ids(tok, renderer, template),
    )
    data.stats = split_stats(data.train, d.max_seq_len, trained_tokens=trained)
    data.stats |= {
        "train": acc.as_dict(),
        "eval": eval_acc.as_dict() if eval_acc else None,
        "template": template.name,
        "eval_samples": n_eval,
    }
    eval_rejects = spool_dir / "eval-rejects.jsonl"
    with open(out / "rejects.jsonl", "ab") as dst:  # train's, then eval's (or empty)
        if eval_rejects.is_file():
            with open(eval_rejects, "rb") as src:
                shutil.copyfileobj(src, dst)
    shutil.rmtree(spool_dir)
    data.save_meta()


def held_any(sel: Selection) -> bool:
    return any(len(idx) for _, idx in sel)


def worker_encoder(
    tokenizer_path: str, trust_remote_code: bool, data: DataSpec
) -> tuple[Plugins, Encoder]:
    """The plugins and encoder `build` uses, rebuilt in a data worker process (workers.py)."""
    plugins = get_plugins()
    return plugins, make_encoder(
        load_tokenizer(Path(tokenizer_path), trust_remote_code), data, plugins
    )


def make_encoder(tok: Any, data: DataSpec, plugins: Plugins) -> Encoder:
    """The data section's template and mask policy over `tok` (one place for parent and workers)."""
    renderer = Renderer(resolve_template(data.template, tok, plugins), tok)
    return Encoder(tok, renderer, data.mask, data.system_prompt)


def _encode_sources(
    config: RunConfig,
    plugins: Plugins,
    encoder: Encoder,
    init: Init,
    acc: Accounting,
    eval_acc: Accounting | None,
    spool_dir: Path,
) -> list[Spool]:
    """One spool of samples per training source, then one per eval source (if any), each
    written as it is encoded."""
    d = config.data
    files = [
        f
        for src in [*d.train, *(d.eval or [])]
        for f in source_files(src.path, every_file=is_dataset_repo(src))
    ]
    sources = [(src, acc) for src in d.train] + [(src, eval_acc) for src in d.eval or []]
    spools = []
    with EncodePool(plugins, encoder, default_workers(files), init) as pool:
        for i, (src, src_acc) in enumerate(sources):
            assert src_acc is not None
            spool = Spool(spool_dir / str(i))
            for (ids, labels), where, n in _source_samples(src, plugins, pool, config, src_acc):
                spool.append(ids, labels, where, n)
            spool.close()
            spools.append(spool)
    return spools


def _source_samples(
    src: DataSource, plugins: Plugins, pool: EncodePool, config: RunConfig, acc: Accounting
) -> Iterator[tuple[Sample, str, int]]:
    """(sample, where, record number) for every piece this source trains on, in file order;
    bad records and length-policy outcomes are counted in `acc`."""
    d = config.data
    fmt = src.format if src.format != "auto" else _detect(src, plugins)
    for outcomes in pool.map(_jobs(src, fmt)):
        for item in outcomes:
            if item[0] == "bad":
                acc.reject(item[1], RecordError(item[2], item[3]))
                continue
            _, where, n, plain, ids, labels = item
            for piece in apply_length(
                (ids, labels),
                where=where,
                max_seq_len=d.max_seq_len,
                policy=d.length_policy,
                plain=plain,
                acc=acc,
            ):
                yield piece, where, n


def _detect(src: DataSource, plugins: Plugins) -> str | None:
    """`format: auto`: the format of the source's first readable record."""
    for rec in read_source(src):
        if rec.data is not None:
            return detect_format(plugins, rec.data, rec.where)
    return None


def _jobs(src: DataSource, fmt: str | None) -> Iterator[Job]:
    chunk: list[Any] = []
    for n, rec in enumerate(read_source(src, parse=False)):
        err = (rec.error.kind, rec.error.reason) if rec.error else None
        chunk.append((n, rec.where, rec.data, err, rec.raw))
        if len(chunk) >= BATCH:
            yield fmt, src, chunk
            chunk = []
    if chunk:
        yield fmt, src, chunk


def _hold_out(
    spools: list[Spool], parts: list[np.ndarray], fraction: float, seed: int
) -> tuple[list[np.ndarray], Selection]:
    """Move `fraction` of each source's records (all pieces of a record together) to eval."""
    rng = np.random.default_rng([seed, 7])
    train_parts, held = [], []
    for s, part in enumerate(parts):
        record = np.frombuffer(spools[s].records, dtype=np.int64)[part]
        records = np.unique(record)
        k = round(fraction * len(records))
        chosen = rng.permutation(records)[:k] if k else records[:0]
        out = np.isin(record, chosen)
        train_parts.append(part[~out])
        held.append((s, part[out]))
    return train_parts, held


def _mix(parts: list[np.ndarray], sources: list[DataSource], seed: int) -> Selection:
    """Concatenate sources; with explicit weights, source i gets weight_i / sum(weights) of the
    samples (its own samples without replacement first, then repeated)."""
    if len(parts) == 1 or all(s.weight is None for s in sources):
        return list(enumerate(parts))
    total = sum(len(p) for p in parts)
    weights = [1.0 if s.weight is None else s.weight for s in sources]
    wsum = sum(weights)
    rng = np.random.default_rng([seed, 11])
    out: Selection = []
    for i, (part, weight) in enumerate(zip(parts, weights, strict=True)):
        want = round(total * weight / wsum)
        if not len(part):
            continue
        idx = np.concatenate([rng.permutation(len(part)) for _ in range(-(-want // len(part)))])
        out.append((i, part[idx[:want]]))
    return out
