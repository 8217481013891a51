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
from megatrain.data.indexed import CorruptShardError, ShardWriter, token_dtype
from megatrain.data.prepared import (FORMAT_VERSION, check_tokenizer_vocab, empty_split_holds_tokens,  # noqa: F401
                                     read_meta, verify_shards)  # (re-exported: the readers' old home)
from megatrain.data.chat import RecordEncoder, chat_template_id, record_text, resolve_chat_template
from megatrain.data.sources import SourceStats, check_sources, describe_sources, iter_documents, resolve_source
from megatrain.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from megatrain.fsutil import fsync_dir
from megatrain.errors import DataError

log = logging.getLogger("megatrain.data")

SPLITS = ("train", "val")
# Tokenizer training sees at most this much text (sampled across train documents): BPE on 4 MB of
# stdlib code takes ~1 s, and more data barely moves bytes/token at vocab 4096.
_TOKENIZER_SAMPLE_BYTES = 4_000_000
_SENTENCE_CHARS = 2000        # training "sentences" are line-aligned chunks of about this size
_BATCH_CHARS = 1 << 20        # text per worker task: big enough to amortise IPC, small enough to balance
_SHARD_TOKENS = 1 << 28       # tokens per shard file (512 MiB at uint16)
_LONG_LINE_CHARS = 1 << 20    # a line longer than this is split into sentences for the tokenizer, with a warning
MIN_TRAINED_VOCAB = 262       # 256 byte-fallback pieces + unk/bos/eos/pad + "\n"/"\t"


def config_fingerprint(data_cfg, seed: int) -> dict[str, Any]:
    """Everything that changes the prepared bytes. Not: path, num_workers, seq_len (read at train time)."""
    tok = data_cfg.tokenizer
    tok_id = None
    if tok is not None:
        tok_abs = os.path.abspath(os.path.expanduser(tok))
        files = [tok_abs] if os.path.isfile(tok_abs) else sorted(glob.glob(os.path.join(tok_abs, "*")))
        tok_id = [tok_abs] + [f"{os.path.basename(f)}:{os.path.getsize(f)}:{int(os.path.getmtime(f))}"
                              for f in files if os.path.isfile(f)]
    out = {
        "format_version": FORMAT_VERSION,
        "sources": describe_sources(list(data_cfg.sources)),
        "source_contents": source_contents(list(data_cfg.sources)),
        "tokenizer": tok_id,
        "vocab_size": data_cfg.vocab_size if tok is None else None,
        "val_fraction": data_cfg.val_fraction,
        "min_chars": data_cfg.min_chars,
        "max_bytes": data_cfg.max_bytes,
        "seed": seed,
    }
    template = getattr(data_cfg, "chat_template", None)
    if template is not None:  # absent when unset, so text corpora prepared before SFT support keep their hash
        out["chat_template"] = chat_template_id(template)
    return out


def source_contents(sources: list[str]) -> dict[str, str]:
    """What each source holds, cheaply: files, bytes and newest mtime, plus a digest of every file's
    (relative path, size, mtime_ns). An edited, added or removed input changes it, so prepared data is keyed by
    the sources' contents, not only their names. ``stdlib`` is pinned by interpreter version in ``sources``."""
    out = {}
    for src in sources:
        if src == "stdlib":
            continue
        root = os.path.abspath(resolve_source(src))
        paths = [root] if os.path.isfile(root) else sorted(
            os.path.join(d, f) for d, _, names in os.walk(root) for f in names)
        digest, total, newest = hashlib.sha256(), 0, 0
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                continue  # vanished while listing; iter_documents reports what it cannot read
            digest.update(f"{os.path.relpath(path, root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            total, newest = total + st.st_size, max(newest, st.st_mtime_ns)
        out[root] = f"{len(paths)} files, {total} bytes, newest {newest}, {digest.hexdigest()[:16]}"
    return out


config_fingerprint_cache: dict[str, dict] = {}  # hash -> fingerprint, to say what changed on a rebuild


def config_hash(data_cfg, seed: int) -> str:
    fingerprint = config_fingerprint(data_cfg, seed)
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    config_fingerprint_cache[digest] = fingerprint
    return digest


def prepare_corpus(data_cfg, *, seed: int = 1234, force: bool = False) -> dict:
    """Prepare ``data_cfg.path`` (see module doc) and return the summary stored in its ``meta.json``,
    plus ``path`` (absolute) and ``reused`` (True when an up-to-date preparation was found)."""
    out_dir = os.path.abspath(os.path.expanduser(data_cfg.path))
    parent, name = os.path.dirname(out_dir), os.path.basename(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"data.path={out_dir} is a file; point data.path at a directory")
    if not os.path.isdir(out_dir):  # to be created: no file in the way, a parent this user can write
        from megatrain.config.preflight import check_output_dir
        check_output_dir("data.path", out_dir)
    os.makedirs(parent, exist_ok=True)
    digest = config_hash(data_cfg, seed)
    force = force or data_cfg.force_prepare
    launch = launch_id()
    with _locked(os.path.join(parent, f".{name}.lock")):  # ranks/terminals preparing the same dir serialise here
        # force rebuilds once per launch: the ranks of one launch that come after the first reuse its build
        existing = None if force and launch is None else _existing_summary(
            out_dir, digest, verify=data_cfg.verify_checksums, launch=launch if force else None)
        if existing is not None:
            return existing
        _refuse_foreign_dir(out_dir)
        check_sources(list(data_cfg.sources))
        for stale in glob.glob(os.path.join(parent, f".{name}.tmp-*")) + glob.glob(os.path.join(parent, f".{name}.old-*")):
            shutil.rmtree(stale, ignore_errors=True)  # leftovers of a killed prepare; we hold the lock
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        try:
            meta = _build(data_cfg, seed, tmp, digest, launch)
            _atomic_swap(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dict(meta, path=out_dir, reused=False)


def launch_id() -> str | None:
    """Same for every rank of one multi-rank deepspeed/torchrun launch (they share the rendezvous); None for
    a single process, where a forced prepare always rebuilds."""
    if "MASTER_PORT" in os.environ and os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
        return ":".join(os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"))
    return None


def _build(data_cfg, seed: int, tmp: str, digest: str, launch: str | None = None) -> dict:
    t0 = time.perf_counter()
    docs, origins, stats = _read_corpus(data_cfg)
    t_read = time.perf_counter() - t0
    is_val = split_documents(len(docs), data_cfg.val_fraction, seed)
    if data_cfg.val_fraction > 0 and len(docs) < 2:
        log.warning("only %d document(s): the validation split is empty and training will run without "
                    "validation; add data or set data.val_fraction=0", len(docs))
    kinds = _kind_counts(docs)
    sft = kinds["prompt_completion"] + kinds["messages"] > 0  # then every shard gets a loss mask
    chat = kinds["messages"] > 0

    t1 = time.perf_counter()
    train_docs = []  # text a tokenizer is trained on (none needed when data.tokenizer is given)
    if data_cfg.tokenizer is None:
        # the trained tokenizer learns the chat template's headers too
        template = resolve_chat_template(data_cfg.chat_template)[0] if chat else None
        train_docs = [record_text(d, template, {"eos_token": "", "bos_token": ""}, o)
                      for o, d, v in zip(origins, docs, is_val) if not v]
    tokenizer, tok_info = _make_tokenizer(data_cfg, tmp, train_docs, seed)
    del train_docs
    t_tok = time.perf_counter() - t1

    template, template_info = None, None
    if chat:
        template, source = resolve_chat_template(data_cfg.chat_template, tokenizer)
        from megatrain.fsutil import atomic_write_text
        atomic_write_text(os.path.join(tmp, "chat_template.jinja"), template)  # generation renders prompts with it
        template_info = {"source": source, "path": "chat_template.jinja",
                         "sha256": hashlib.sha256(template.encode()).hexdigest()[:16]}
    t2 = time.perf_counter()
    dtype = token_dtype(tokenizer.vocab_size)
    splits = {}
    for split in SPLITS:
        picked = [(o, d) for o, d, v in zip(origins, docs, is_val) if v == (split == "val")]
        splits[split] = _write_split(picked, os.path.join(tmp, split), tok_info["path_abs"], tokenizer,
                                     dtype, data_cfg.num_workers, template=template, with_mask=sft)
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
        "eos_appended": True,  # every document ends with eos_id (a chat: maybe followed by the template's whitespace)
        "loss_mask": sft,      # shards carry <name>.mask: 1 = completion/assistant token (a loss target)
        "record_kinds": kinds,
        "chat_template": template_info,
        "num_docs": len(docs),
        "num_tokens": sum(s["num_tokens"] for s in splits.values()),
        "text_bytes": stats["bytes_kept"],
        "splits": splits,
        "prepared_by": launch,
        "stats": stats,
        "seconds": {"read_clean": round(t_read, 3), "tokenizer": round(t_tok, 3), "encode_write": round(t_encode, 3),
                    "total": round(time.perf_counter() - t0, 3)},
    }
    _write_json(os.path.join(tmp, "meta.json"), meta)  # written last: its presence marks a complete dir
    return meta


def _kind_counts(docs: list) -> dict[str, int]:
    counts = {"text": 0, "prompt_completion": 0, "messages": 0}
    for d in docs:
        counts["text" if isinstance(d, str) else "messages" if "messages" in d else "prompt_completion"] += 1
    return counts


def _doc_bytes(doc) -> int:
    if isinstance(doc, str):
        return len(doc.encode("utf-8"))
    if "messages" in doc:
        return sum(len(m["content"].encode("utf-8")) for m in doc["messages"])
    return len(doc["prompt"].encode("utf-8")) + len(doc["completion"].encode("utf-8"))


def _read_corpus(data_cfg) -> tuple[list, list[str], dict]:
    """(documents: cleaned text or SFT records, their origins, stats)."""
    src_stats = SourceStats()
    cleaner = Cleaner(min_chars=data_cfg.min_chars)
    docs: list = []
    origins: list[str] = []
    total = 0
    truncated = False
    for origin, raw in iter_documents(list(data_cfg.sources), src_stats):
        text = cleaner(raw) if isinstance(raw, str) else cleaner.record(raw)
        if text is None:
            continue
        docs.append(text)
        origins.append(origin)
        total += _doc_bytes(text)
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
    return docs, origins, stats


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
        try:
            given = load_tokenizer(src)
        except (RuntimeError, OSError) as err:  # sentencepiece's "INTERNAL: ..." for a file that is not a model
            detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
            raise DataError(f"data.tokenizer={src}: not a sentencepiece .model or Hugging Face tokenizer "
                            f"({detail}); point it at a tokenizer or leave it unset to train one") from None
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
        if data_cfg.vocab_size < MIN_TRAINED_VOCAB:
            raise DataError(f"data.vocab_size={data_cfg.vocab_size} is below {MIN_TRAINED_VOCAB}, the 256 byte "
                            "pieces + special tokens every trained tokenizer holds; raise data.vocab_size")
        try:
            train_sentencepiece(_tokenizer_sample(train_docs, seed), os.path.join(tmp, rel),
                                vocab_size=data_cfg.vocab_size, num_threads=max(1, data_cfg.num_workers))
        except RuntimeError as err:
            detail = (str(err).strip().splitlines() or ["RuntimeError"])[0][:160]
            raise DataError(f"data.vocab_size={data_cfg.vocab_size}: sentencepiece cannot train on this corpus "
                            f"({detail}); change data.vocab_size or add data") from None
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
    drops sentences longer than max_sentence_length, so very long lines are cut. Linear in the text read:
    a long line is cut by index (never by re-slicing its remainder, which copied it once per chunk), and the
    budget is checked after every chunk, so a 200 MB line costs at most ``budget`` chars of work here.
    """
    order = np.random.default_rng([seed, 0x70C]).permutation(len(docs))
    used, warned = 0, False
    for i in order:
        buf, size = [], 0
        for line in _lines(docs[i]):
            if len(line) > _SENTENCE_CHARS:
                if len(line) > _LONG_LINE_CHARS and not warned:
                    warned = True
                    log.warning("a %d-character line (document %d) is split into %d-character pieces for "
                                "tokenizer training; is this input meant to be text?", len(line), i, _SENTENCE_CHARS)
                for start in range(0, len(line) - _SENTENCE_CHARS, _SENTENCE_CHARS):
                    yield line[start:start + _SENTENCE_CHARS]
                    used += _SENTENCE_CHARS
                    if used >= budget:
                        return
                line = line[len(line) - (len(line) - 1) % _SENTENCE_CHARS - 1:]  # the last 1.._SENTENCE_CHARS
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


def _lines(text: str) -> Iterator[str]:
    """``text.splitlines(keepends=True)`` lazily, on '\\n' only (one pass, no list of every line)."""
    start, n = 0, len(text)
    while start < n:
        end = text.find("\n", start)
        end = n if end < 0 else end + 1
        yield text[start:end]
        start = end


# ------------------------------------------------------------------------------------- encode and write

_worker_tok: Tokenizer | None = None
_worker_encoder: RecordEncoder | None = None


def _worker_init(tok_path: str, template: str | None = None) -> None:
    global _worker_tok, _worker_encoder
    _worker_tok = load_tokenizer(tok_path)
    _worker_encoder = RecordEncoder(_worker_tok, template)


def _encode_batch(batch: list[tuple[str, str | dict]], tokenizer: Tokenizer, encoder: RecordEncoder,
                  with_mask: bool) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(ids with the trailing EOS, mask or None) per document. Plain text goes through ``encode_batch``."""
    if not with_mask:
        eos = [tokenizer.eos_id]
        return [(np.asarray(ids + eos, dtype=np.int64), None) for ids in tokenizer.encode_batch([d for _, d in batch])]
    return [encoder.encode(doc, origin) for origin, doc in batch]


def _worker_encode(args) -> list[tuple[np.ndarray, np.ndarray | None]]:
    batch, with_mask = args
    return _encode_batch(batch, _worker_tok, _worker_encoder, with_mask)


def _batches(docs: list[tuple[str, str | dict]]) -> Iterator[list[tuple[str, str | dict]]]:
    batch, size = [], 0
    for item in docs:
        batch.append(item)
        size += len(item[1]) if isinstance(item[1], str) else _doc_bytes(item[1])
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encoded(docs: list[tuple[str, str | dict]], tok_path: str, tokenizer: Tokenizer, num_workers: int, *,
             template: str | None = None, with_mask: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(ids, mask) of ``docs`` ((origin, text or record) pairs), in order. Worker processes are spawned (not
    forked): the parent may hold torch/OpenMP threads, and a forked child of a threaded parent can deadlock."""
    batches = list(_batches(docs))
    if num_workers <= 1 or len(batches) <= 1:
        encoder = RecordEncoder(tokenizer, template)
        for batch in batches:
            yield from _encode_batch(batch, tokenizer, encoder, with_mask)
        return
    with mp.get_context("spawn").Pool(min(num_workers, len(batches)), initializer=_worker_init,
                                      initargs=(tok_path, template)) as pool:
        for arrays in pool.imap(_worker_encode, [(b, with_mask) for b in batches]):  # imap keeps document order
            yield from arrays


def _write_split(docs: list[tuple[str, str | dict]], prefix: str, tok_path: str, tokenizer: Tokenizer, dtype,
                 num_workers: int, *, template: str | None = None, with_mask: bool = False) -> dict:
    shards, writer, num_docs, num_tokens, checksums, targets = [], None, 0, 0, {}, 0
    name = os.path.basename(prefix)
    for ids, mask in _encoded(docs, tok_path, tokenizer, num_workers, template=template, with_mask=with_mask):
        if writer is None or (writer.num_tokens and writer.num_tokens + ids.size > _SHARD_TOKENS):
            if writer is not None:
                writer.close()
                checksums[shards[-1]] = writer.record
            shards.append(f"{name}-{len(shards):05d}")
            writer = ShardWriter(os.path.join(os.path.dirname(prefix), shards[-1]), dtype, with_mask=with_mask)
        writer.add(ids, mask)  # (doc_len + 1,): the document's tokens, then EOS
        num_docs += 1
        num_tokens += ids.size
        targets += int(mask.sum()) if mask is not None else ids.size
    if writer is None:  # an empty split still gets a (valid, empty) shard so readers need no special case
        shards.append(f"{name}-00000")
        writer = ShardWriter(os.path.join(os.path.dirname(prefix), shards[-1]), dtype, with_mask=with_mask)
    writer.close()
    checksums[shards[-1]] = writer.record
    out = {"num_docs": num_docs, "num_tokens": num_tokens, "shards": shards, "checksums": checksums}
    if with_mask:
        out["num_target_tokens"] = targets
    return out


# ------------------------------------------------------------------------------- idempotence, atomicity

def _existing_summary(out_dir: str, digest: str, *, verify: bool = True, launch: str | None = None) -> dict | None:
    """The summary of an up-to-date, intact preparation in ``out_dir``, or None (with the reason logged).
    ``launch``: reuse only a preparation made by that launch (force_prepare)."""
    try:
        meta = read_meta(out_dir)
    except DataError:
        return None
    if launch is not None and meta.get("prepared_by") != launch:
        log.info("%s: data.force_prepare is set; preparing again", out_dir)
        return None
    if meta.get("config_hash") != digest:
        old, new = meta.get("config") or {}, config_fingerprint_cache.get(digest, {})
        changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if "source_contents" in changed:
            log.warning("%s: the contents of data.sources changed since it was prepared; preparing again", out_dir)
        else:
            log.warning("%s was prepared from a different data config (%s differ); preparing again", out_dir,
                        ", ".join(changed) or "config hash")
        return None
    try:
        verify_shards(out_dir, meta, checksums=verify)
    except CorruptShardError as err:
        log.warning("%s; preparing again", err)
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
