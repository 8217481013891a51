"""Which rank failed, and why: the failing rank writes its one-line reason to ``<log.dir>/error_rank<R>.txt``;
a rank that fails *because* a peer died (gloo/NCCL "Connection closed by peer") prints that peer's line last
("rank R failed: <line>") instead of its own transport error, which hides the cause.
"""
from __future__ import annotations

import glob
import os
import re
import sys
import time

from megatrain.fsutil import atomic_write_text

PEER_WAIT_S = 3.0  # the dying rank writes its line before it exits; its peers notice the closed socket after


def _path(log_dir: str, rank: int) -> str:
    return os.path.join(log_dir, f"error_rank{rank}.txt")


def this_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def clear(log_dir: str, rank: int) -> None:
    """Remove this rank's line of an earlier run (before the process group exists, so before any failure)."""
    try:
        os.remove(_path(log_dir, rank))
    except OSError:
        pass


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def record(log_dir: str, rank: int, line: str) -> None:
    try:
        os.makedirs(log_dir, exist_ok=True)
        atomic_write_text(_path(log_dir, rank), line + "\n")
    except OSError:
        pass  # an unwritable log.dir must not hide the error being reported


def peer_failure(log_dir: str, rank: int, *, wait_s: float = PEER_WAIT_S) -> tuple[int, str] | None:
    """(rank, line) of the first other rank that recorded a failure, waiting up to ``wait_s`` for one."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for path in glob.glob(os.path.join(log_dir, "error_rank*.txt")):
            m = re.search(r"error_rank(\d+)\.txt$", path)
            if m and int(m.group(1)) != rank:
                try:
                    with open(path, encoding="utf-8") as f:
                        found.append((os.path.getmtime(path), int(m.group(1)), f.read().strip()))
                except OSError:
                    continue
        if found:
            _, peer, line = min(found)  # the first to fail is the cause
            return peer, line
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def report(log_dir: str, err: BaseException, *, rank: int | None = None) -> None:
    """After this rank's own traceback: if a peer failed first, print its line last; else record ours."""
    rank = this_rank() if rank is None else rank
    peer = peer_failure(log_dir, rank, wait_s=PEER_WAIT_S if _transport_error(err) else 0.0)
    if peer is not None:
        print(f"rank {rank}: stopped because another rank failed ({one_line(err)[:160]})", file=sys.stderr)
        print(f"rank {peer[0]} failed: {peer[1]}", file=sys.stderr, flush=True)
    else:
        record(log_dir, rank, one_line(err))


def _transport_error(err: BaseException) -> bool:
    """Errors a collective raises when a peer's connection goes away (gloo, NCCL, the c10d store)."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        k in text for k in ("connection closed", "connection reset", "broken pipe", "peer", "nccl", "gloo",
                            "timed out", "socket"))
