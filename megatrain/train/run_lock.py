"""Exclusive run directories: ``<dir>/.megatrain.lock`` holds the running job's host, pid and start time.

Created with O_EXCL by rank 0 before anything in the directory is written, removed when the run ends. A lock
whose holder is gone (same host, pid not alive or a different process under that pid) is stale and taken over
with a note; a live holder, or one on another host (whose pid cannot be checked from here), refuses the run in
one line naming the holder and the lock file.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time

from megatrain.errors import ConfigError

LOCK_NAME = ".megatrain.lock"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid from the holder)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = holder.get("started")
    return started is None or _start_time(pid) in (None, started)


class RunLock:
    """Lock ``dirs`` (deduplicated) for this process; ``release`` removes them. ``field`` names the config
    field of each directory for the refusal line."""

    def __init__(self, dirs: dict[str, str]):
        self.paths: list[str] = []
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        seen = set()
        try:
            for field, directory in dirs.items():
                path = os.path.join(os.path.abspath(directory), LOCK_NAME)
                if path in seen:
                    continue
                seen.add(path)
                self._take(path, field, directory, me)
                self.paths.append(path)
        except BaseException:
            self.release()
            raise

    @staticmethod
    def _take(path: str, field: str, directory: str, me: dict) -> None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as err:
            raise ConfigError(f"{field}={directory}: cannot create the directory ({err.strerror}); pick a writable "
                              "path") from None
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read(path)
                if holder is None:  # empty: being written by a run starting now, or left by a crash
                    time.sleep(0.5)
                    holder = _read(path)
                if holder is not None and (holder.get("host") != me["host"] or _alive(holder)):
                    raise ConfigError(
                        f"{field}={directory} is in use by pid {holder.get('pid')} on {holder.get('host')} since "
                        f"{holder.get('since')} ({path}); use another {field}, or delete the lock if that run is "
                        "gone") from None
                print(f"megatrain: taking over stale lock {path} (holder {holder} is not running)",
                      file=sys.stderr, flush=True)
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
                continue
            except OSError as err:
                raise ConfigError(f"{field}={directory}: cannot write {path} ({err.strerror}); pick a writable "
                                  "directory") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            return
        raise ConfigError(f"{field}={directory}: another run keeps taking {path}; use another {field}")

    def release(self) -> None:
        for path in self.paths:
            holder = _read(path)
            if holder is not None and holder.get("pid") == os.getpid():
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
        self.paths = []


def _read(path: str) -> dict | None:
    """The holder recorded in ``path``; None for an empty or unreadable lock (a crash while writing it)."""
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None
