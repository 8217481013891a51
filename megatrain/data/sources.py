"""Source enumeration: ``data.sources`` entries → a lazy, deterministic stream of raw documents.

An entry is a text file (one document), a folder (every text-like file below it, sorted), a ``.jsonl``
file (one record per line: ``{"text"}``, ``{"prompt", "completion"}`` or ``{"messages"}``, one shape per file - see
megatrain/data/chat.py; a ``.json`` file whose first line is a whole JSON object is read the same way),
``stdlib`` (the CPython standard-library ``.py`` files) or ``chat_demo`` (the chat JSONL megatrain ships,
megatrain/data/corpora/chat_demo.jsonl, written by megatrain/data/chat_demo.py).

A document is a ``str`` (text) or a ``dict`` record (prompt/completion or messages).

Files (and .jsonl lines) that are not valid UTF-8 are skipped, counted, and reported once as a warning (with the first
few paths); a corpus that ends up empty says how many were skipped. Binary files inside folders
(a NUL byte in the first 8 KiB, or a known binary extension) are skipped and counted too.
"""
from __future__ import annotations

import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Iterator
from megatrain.data.chat import record_kind
from megatrain.errors import DataError

STDLIB = "stdlib"
CHAT_DEMO = "chat_demo"
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "node_modules"}
_BINARY_EXT = {
    ".pyc", ".pyo", ".so", ".o", ".a", ".dll", ".dylib", ".exe", ".png", ".jpg", ".jpeg", ".gif", ".bmp",
    ".ico", ".zip", ".gz", ".bz2", ".xz", ".zst", ".tar", ".whl", ".pdf", ".bin", ".idx", ".npy", ".npz",
    ".pt", ".pth", ".safetensors", ".model", ".wav", ".mp3", ".mp4", ".ttf", ".woff", ".woff2", ".db", ".sqlite",
}
_SNIFF_BYTES = 8192


@dataclass
class SourceStats:
    files_read: int = 0
    skipped_binary: int = 0
    undecodable: list = field(default_factory=list)  # paths (path:line for jsonl) that are not UTF-8

    def as_dict(self) -> dict:
        return {"files_read": self.files_read, "skipped_binary": self.skipped_binary,
                "skipped_undecodable": len(self.undecodable)}


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def chat_demo_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpora", "chat_demo.jsonl")


def resolve_source(src: str) -> str:
    """The path a ``data.sources`` entry reads (``chat_demo`` → the shipped file); ``stdlib`` stays a name."""
    return chat_demo_path() if src == CHAT_DEMO else os.path.expanduser(src)


def describe_sources(sources: list[str]) -> list[str]:
    """Absolute, hashable form of ``sources`` (``stdlib`` pinned to this interpreter's path and version)."""
    out = []
    for src in sources:
        if src == STDLIB:
            out.append(f"stdlib:{stdlib_root()}:{sys.version_info.major}.{sys.version_info.minor}")
        else:
            out.append(os.path.abspath(resolve_source(src)))
    return out


def check_sources(sources: list[str]) -> None:
    if not sources:
        raise DataError("data.sources is empty; list files, folders, .jsonl files, 'stdlib' or 'chat_demo'")
    for src in sources:
        if src != STDLIB and not os.path.exists(resolve_source(src)):
            raise DataError(f"data.sources: {src} does not exist; fix the path (relative paths are taken "
                             f"from {os.getcwd()}) or use 'stdlib'")


def iter_documents(sources: list[str], stats: SourceStats) -> Iterator[tuple[str, str | dict]]:
    """Yield ``(origin, raw_text or record)`` in a deterministic order; ``origin`` is ``path`` or ``path:line``."""
    check_sources(sources)
    for src in sources:
        if src == STDLIB:
            yield from _iter_files(_walk(stdlib_root(), only_ext=".py"), stats, sniff=False)
            continue
        src = resolve_source(src)
        if os.path.isdir(src):
            yield from _iter_files(_walk(src), stats, sniff=True)
        else:
            yield from _iter_files([src], stats, sniff=False)


def _walk(root: str, only_ext: str | None = None) -> Iterator[str]:
    # Sorted dirs and files: the corpus (and so max_bytes truncation) is the same on every run.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            ext = os.path.splitext(name)[1].lower()
            if only_ext is not None and ext != only_ext:
                continue
            yield os.path.join(dirpath, name)


def _iter_files(paths, stats: SourceStats, *, sniff: bool) -> Iterator[tuple[str, str]]:
    for path in paths:
        if path.lower().endswith(".jsonl") or (path.lower().endswith(".json") and _is_json_lines(path)):
            stats.files_read += 1
            yield from _iter_jsonl(path, stats)
            continue
        if sniff and os.path.splitext(path)[1].lower() in _BINARY_EXT:
            stats.skipped_binary += 1
            continue
        with open(path, "rb") as f:
            raw = f.read()
        if sniff and b"\x00" in raw[:_SNIFF_BYTES]:
            stats.skipped_binary += 1
            continue
        try:
            text = raw.decode("utf-8-sig")  # -sig: a leading BOM is an encoding marker, not text
        except UnicodeDecodeError:
            stats.undecodable.append(path)
            continue
        stats.files_read += 1
        yield path, text


def _is_json_lines(path: str) -> bool:
    """A ``.json`` whose first non-blank line is a whole JSON object is JSON-lines (many datasets are
    published so); anything else (one pretty-printed document) stays one raw-text document."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    return isinstance(json.loads(raw.decode("utf-8-sig")), dict)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    return False
    return False


def _iter_jsonl(path: str, stats: SourceStats) -> Iterator[tuple[str, str | dict]]:
    first = None  # (kind, line) of the file's first record
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                stats.undecodable.append(f"{path}:{lineno}")  # same policy as a non-UTF-8 file: skip, count
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg}); each line must be one JSON object "
                                 "like {\"text\": ...}, {\"prompt\": ..., \"completion\": ...} or "
                                 "{\"messages\": [...]}") from None
            origin = f"{path}:{lineno}"
            kind = record_kind(obj, origin)
            if first is None:
                first = (kind, lineno)
            elif kind != first[0]:
                raise DataError(f"{origin}: a {kind} record in a file of {first[0]} records (line {first[1]}); "
                                "one shape per file - put each shape in its own .jsonl")
            if kind != "text":
                yield origin, _replace_surrogates(obj)
                continue
            text = obj["text"]
            # JSON may carry lone surrogates ("\ud800"), which cannot be written as UTF-8; replace them.
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                text = text.encode("utf-8", "replace").decode("utf-8")
            yield origin, text


def _replace_surrogates(obj):
    """A record with every string made UTF-8 encodable (lone surrogates replaced)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
            return obj
        except UnicodeEncodeError:
            return obj.encode("utf-8", "replace").decode("utf-8")
    if isinstance(obj, dict):
        return {k: _replace_surrogates(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace_surrogates(v) for v in obj]
    return obj
