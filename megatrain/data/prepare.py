"""``prepare_corpus``: sources → clean/dedup → tokenizer → parallel tokenization → .bin/.idx shards + meta.json.

The output directory (``data.path``) is built in a temp dir beside it and renamed into place only when
complete, so an interrupted prepare never leaves a directory that looks valid. A second call with the
same data config finds ``meta.json`` with the same config hash and returns its summary without work.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from typing import Any, Iterator

import numpy as np

from megatrain.data.clean import Cleaner
from megatrain.data.indexed import CorruptShardError, ShardReader, ShardWriter, token_dtype
from megatrain.data.sources import SourceStats, check_sources, describe_sources, iter_documents
from megatrain.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from megatrain.fsutil import fsync_dir
from megatrain.errors import DataError

log = logging.getLogger("megatrain.data")

FORMAT_VERSION = 1
SPLITS = ("train", "val")
# Tokenizer training sees at most this much text (sampled across train documents): BPE on 4 MB of
# stdlib code takes ~1 s, and more data barely moves bytes/token at vocab 4096.
_TOKENIZER_SAMPLE_BYTES = 4_000_000
_SENTENCE_CHARS = 2000        # training "sentences" are line-aligned chunks of about this size
_BATCH_CHARS = 1 << 20        # text per worker task: big enough to amortise IPC, small enough to balance
_SHARD_TOKENS = 1 << 28       # tokens per shard file (512 MiB at uint16)


def config_fingerprint(data_cfg, seed: int) -> dict[str, Any]:
    """Everything that changes the prepared bytes. Not: path, num_workers, seq_len (read at train time)."""
    tok = data_cfg.tokenizer
    tok_id = None
    if tok is not None:
        tok_abs = os.path.abspath(os.path.expanduser(tok))
        files = [tok_abs] if os.path.isfile(tok_abs) else sorted(glob.glob(os.path.join(tok_abs, "*")))
        tok_id = [tok_abs] + [f"{os.path.basename(f)}:{os.path.getsize(f)}:{int(os.path.getmtime(f))}"
                              for f in files if os.path.isfile(f)]
    return {
        "format_version": FORMAT_VERSION,
        "sources": describe_sources(list(data_cfg.sources)),
        "tokenizer": tok_id,
        "vocab_size": data_cfg.vocab_size if tok is None else None,
        "val_fraction": data_cfg.val_fraction,
        "min_chars": data_cfg.min_chars,
        "max_bytes": data_cfg.max_bytes,
        "seed": seed,
    }


def config_hash(data_cfg, seed: int) -> str:
    blob = json.dumps(config_fingerprint(data_cfg, seed), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def prepare_corpus(data_cfg, *, seed: int = 1234, force: bool = False) -> dict:
    """Prepare ``data_cfg.path`` (see module doc) and return the summary stored in its ``meta.json``,
    plus ``path`` (absolute) and ``reused`` (True when an up-to-date preparation was found)."""
    out_dir = os.path.abspath(os.path.expanduser(data_cfg.path))
    parent, name = os.path.dirname(out_dir), os.path.basename(out_dir)
    os.makedirs(parent, exist_ok=True)
    digest = config_hash(data_cfg, seed)
    with _locked(os.path.join(parent, f".{name}.lock")):  # ranks/terminals preparing the same dir serialise here
        if not force:
            existing = _existing_summary(out_dir, digest)
            if existing is not None:
                return existing
        _refuse_foreign_dir(out_dir)
        check_sources(list(data_cfg.sources))
        for stale in glob.glob(os.path.join(parent, f".{name}.tmp-*")) + glob.glob(os.path.join(parent, f".{name}.old-*")):
            shutil.rmtree(stale, ignore_errors=True)  # leftovers of a killed prepare; we hold the lock
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        try:
            meta = _build(data_cfg, seed, tmp, digest)
            _atomic_swap(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dict(meta, path=out_dir, reused=False)


def _build(data_cfg, seed: int, tmp: str, digest: str) -> dict:
    t0 = time.perf_counter()
    docs, stats = _read_corpus(data_cfg)
    t_read = time.perf_counter() - t0
    is_val = split_documents(len(docs), data_cfg.val_fraction, seed)
    if data_cfg.val_fraction > 0 and len(docs) < 2:
        log.warning("only %d document(s): the validation split is empty; add data or set data.val_fraction=0",
                    len(docs))

    t1 = time.perf_counter()
    tokenizer, tok_info = _make_tokenizer(data_cfg, tmp, [d for d, v in zip(docs, is_val) if not v], seed)
    t_tok = time.perf_counter() - t1

    t2 = time.perf_counter()
    dtype = token_dtype(tokenizer.vocab_size)
    splits = {}
    for split in SPLITS:
        texts = [d for d, v in zip(docs, is_val) if v == (split == "val")]
        splits[split] = _write_split(texts, os.path.join(tmp, split), tok_info["path_abs"], tokenizer,
                                     dtype, data_cfg.num_workers)
    t_encode = time.perf_counter() - t2

    meta = {
        "format_version": FORMAT_VERSION,
        "config_hash": digest,
        "config": config_fingerprint(data_cfg, seed),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "bos_id": tokenizer.bos_id,
        "pad_id": tokenizer.pad_id,
        "tokenizer": {k: v for k, v in tok_info.items() if k != "path_abs"},
        "token_dtype": dtype.name,
        "eos_appended": True,  # every document is stored as its tokens followed by eos_id
        "num_docs": len(docs),
        "num_tokens": sum(s["num_tokens"] for s in splits.values()),
        "text_bytes": stats["bytes_kept"],
        "splits": splits,
        "stats": stats,
        "seconds": {"read_clean": round(t_read, 3), "tokenizer": round(t_tok, 3), "encode_write": round(t_encode, 3),
                    "total": round(time.perf_counter() - t0, 3)},
    }
    _write_json(os.path.join(tmp, "meta.json"), meta)  # written last: its presence marks a complete dir
    return meta


def _read_corpus(data_cfg) -> tuple[list[str], dict]:
    src_stats = SourceStats()
    cleaner = Cleaner(min_chars=data_cfg.min_chars)
    docs: list[str] = []
    total = 0
    truncated = False
    for _origin, raw in iter_documents(list(data_cfg.sources), src_stats):
        text = cleaner(raw)
        if text is None:
            continue
        docs.append(text)
        total += len(text.encode("utf-8"))
        if data_cfg.max_bytes is not None and total >= data_cfg.max_bytes:
            truncated = True  # the document that crosses max_bytes is kept whole: no cut documents
            break
    bad = src_stats.undecodable
    if bad:
        log.warning("skipped %d input(s) that are not valid UTF-8 (e.g. %s); re-encode them as UTF-8 to include them",
                    len(bad), ", ".join(bad[:3]))
    stats = dict(src_stats.as_dict(), **cleaner.stats(), bytes_kept=total, stopped_at_max_bytes=truncated)
    if not docs:
        raise DataError(
            f"data.sources={list(data_cfg.sources)}: no documents left ({stats['files_read']} files read, "
            f"{stats['dropped_short']} shorter than data.min_chars={data_cfg.min_chars}, "
            f"{stats['dropped_duplicate']} duplicates, {len(bad)} not UTF-8, {stats['skipped_binary']} binary); "
            "add text sources or lower data.min_chars")
    return docs, stats


def split_documents(num_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """(num_docs,) bool, True = validation. A seeded choice of round(num_docs*val_fraction) documents,
    at least 1 (and at most num_docs-1) when val_fraction > 0 and there are 2+ documents."""
    is_val = np.zeros(num_docs, dtype=bool)
    if val_fraction <= 0 or num_docs < 2:
        return is_val
    num_val = min(max(1, round(num_docs * val_fraction)), num_docs - 1)
    rng = np.random.default_rng([seed, 0x5A11])  # own stream: the split never shifts with other seeded draws
    is_val[rng.permutation(num_docs)[:num_val]] = True
    return is_val


# ---------------------------------------------------------------------------------------------- tokenizer

def _make_tokenizer(data_cfg, tmp: str, train_docs: list[str], seed: int) -> tuple[Tokenizer, dict]:
    """Copy the given tokenizer into the data dir (so the dir is self-contained), or train one."""
    if data_cfg.tokenizer is not None:
        src = os.path.expanduser(data_cfg.tokenizer)
        given = load_tokenizer(src)
        if given.kind == "sentencepiece":
            rel = "tokenizer.model"
            shutil.copyfile(given.path, os.path.join(tmp, rel))
        else:
            rel = "tokenizer"
            given.tok.save_pretrained(os.path.join(tmp, rel))
        info = {"kind": given.kind, "path": rel, "source": os.path.abspath(src)}
    else:
        rel = "tokenizer.model"
        if not train_docs:
            raise DataError("no training documents to learn a tokenizer from; add data or set data.tokenizer")
        train_sentencepiece(_tokenizer_sample(train_docs, seed), os.path.join(tmp, rel),
                            vocab_size=data_cfg.vocab_size, num_threads=max(1, data_cfg.num_workers))
        info = {"kind": "sentencepiece", "path": rel, "source": "trained"}
    info["path_abs"] = os.path.join(tmp, rel)
    tok = load_tokenizer(info["path_abs"])
    if data_cfg.tokenizer is None and tok.vocab_size < data_cfg.vocab_size:
        log.warning("corpus supports only %d tokenizer pieces (data.vocab_size=%d asked); using %d",
                    tok.vocab_size, data_cfg.vocab_size, tok.vocab_size)
    return tok, info


def _tokenizer_sample(docs: list[str], seed: int, budget: int = _TOKENIZER_SAMPLE_BYTES) -> Iterator[str]:
    """Line-aligned chunks of ~_SENTENCE_CHARS from documents in a seeded order, up to ``budget`` chars.

    Chunks (not single lines) so '\\n' and indentation appear inside training sentences; sentencepiece
    drops sentences longer than max_sentence_length, so very long lines are cut.
    """
    order = np.random.default_rng([seed, 0x70C]).permutation(len(docs))
    used = 0
    for i in order:
        buf, size = [], 0
        for line in docs[i].splitlines(keepends=True):
            while len(line) > _SENTENCE_CHARS:
                yield line[:_SENTENCE_CHARS]
                used += _SENTENCE_CHARS
                line = line[_SENTENCE_CHARS:]
            buf.append(line)
            size += len(line)
            if size >= _SENTENCE_CHARS:
                yield "".join(buf)
                used, buf, size = used + size, [], 0
            if used >= budget:
                return
        if buf:
            yield "".join(buf)
            used += size
        if used >= budget:
            return


# ------------------------------------------------------------------------------------- encode and write

_worker_tok: Tokenizer | None = None


def _worker_init(tok_path: str) -> None:
    global _worker_tok
    _worker_tok = load_tokenizer(tok_path)


def _worker_encode(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int64) for ids in _worker_tok.encode_batch(texts)]


def _batches(texts: list[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encoded(texts: list[str], tok_path: str, tokenizer: Tokenizer, num_workers: int) -> Iterator[np.ndarray]:
    """Token arrays of ``texts``, in order. Worker processes are spawned (not forked): the parent may
    hold torch/OpenMP threads, and a forked child of a threaded parent can deadlock."""
    batches = list(_batches(texts))
    if num_workers <= 1 or len(batches) <= 1:
        for batch in batches:
            yield from (np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(batch))
        return
    with mp.get_context("spawn").Pool(min(num_workers, len(batches)), initializer=_worker_init,
                                      initargs=(tok_path,)) as pool:
        for arrays in pool.imap(_worker_encode, batches):  # imap keeps document order
            yield from arrays


def _write_split(texts: list[str], prefix: str, tok_path: str, tokenizer: Tokenizer, dtype,
                 num_workers: int) -> dict:
    eos = np.asarray([tokenizer.eos_id], dtype=np.int64)
    shards, writer, num_docs, num_tokens = [], None, 0, 0
    name = os.path.basename(prefix)
    for ids in _encoded(texts, tok_path, tokenizer, num_workers):
        if writer is None or (writer.num_tokens and writer.num_tokens + ids.size + 1 > _SHARD_TOKENS):
            if writer is not None:
                writer.close()
            shards.append(f"{name}-{len(shards):05d}")
            writer = ShardWriter(os.path.join(os.path.dirname(prefix), shards[-1]), dtype)
        writer.add(np.concatenate([ids, eos]))  # (doc_len + 1,)
        num_docs += 1
        num_tokens += ids.size + 1
    if writer is None:  # an empty split still gets a (valid, empty) shard so readers need no special case
        shards.append(f"{name}-00000")
        writer = ShardWriter(os.path.join(os.path.dirname(prefix), shards[-1]), dtype)
    writer.close()
    return {"num_docs": num_docs, "num_tokens": num_tokens, "shards": shards}


# ------------------------------------------------------------------------------- idempotence, atomicity

def read_meta(data_dir: str) -> dict:
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"{data_dir} is not a prepared data directory (no meta.json); run "
                         "`python launch/prepare.py --config <recipe>` or fix data.path")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: data format version {meta.get('format_version')}, this megatrain reads "
                         f"{FORMAT_VERSION}; prepare again with --force")
    return meta


def _existing_summary(out_dir: str, digest: str) -> dict | None:
    try:
        meta = read_meta(out_dir)
    except (ValueError, json.JSONDecodeError):
        return None
    if meta.get("config_hash") != digest:
        log.info("%s was prepared from a different data config; preparing again", out_dir)
        return None
    try:
        for split in meta["splits"].values():
            for shard in split["shards"]:
                ShardReader(os.path.join(out_dir, shard))
    except (CorruptShardError, KeyError) as err:
        log.warning("%s: %s; preparing again", out_dir, err)
        return None
    return dict(meta, path=out_dir, reused=True)


def _refuse_foreign_dir(out_dir: str) -> None:
    # We only ever replace a directory we made (it has meta.json) or an empty one: never a user's files.
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "meta.json")):
        raise DataError(f"data.path={out_dir} exists, is not empty and holds no meta.json; "
                         "point data.path at a new or empty directory")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"data.path={out_dir} is a file; point data.path at a directory")


def _atomic_swap(tmp: str, out_dir: str) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the data dir should read like any other
    fsync_dir(tmp)
    parent = os.path.dirname(out_dir)
    old = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
        os.rename(out_dir, os.path.join(old, "d"))
    os.rename(tmp, out_dir)
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _locked(lock_path: str):
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
