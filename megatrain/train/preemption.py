"""Preemption: a signal on any rank → every rank finishes its step, saves, and exits with ``EXIT_PREEMPTED``.

The handler only sets a flag; the trainer folds it into the once-per-step statistics reduction, so all ranks
see it after the same step and save together (a signal to one rank is enough). A second signal exits at once.
Signals that arrive within ``DUPLICATE_S`` of the first count as one: ``kill -TERM -<pgid>`` reaches each rank
directly *and* through its launcher (deepspeed's launch.py and torchrun forward SIGTERM to their children).

A rank also preempts itself when its launcher is gone: the ``deepspeed`` runner dies on SIGTERM without
telling its launch.py child, which would leave the ranks training with no parent (and rewriting ``latest``).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again" (resume with --checkpoint.resume=auto)
DUPLICATE_S = 1.0
WATCH_S = 0.5


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Preemption:
    """Installs the handlers (main thread only) and the launcher watch; ``requested`` is this rank's flag."""

    def __init__(self, signals: list[str], *, rank: int = 0):
        self.rank = rank
        self.signame: str | None = None
        self._first = 0.0
        self._previous: dict[int, object] = {}
        self._stop = threading.Event()
        if not signals or threading.current_thread() is not threading.main_thread():
            return
        for name in signals:
            num = getattr(signal, name)
            self._previous[num] = signal.signal(num, self._handle)
        self._watch = threading.Thread(target=self._watch_launcher, name="megatrain-launcher-watch", daemon=True)
        self._watch.start()

    @property
    def requested(self) -> bool:
        return self.signame is not None

    def _handle(self, signum, frame) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        now = time.monotonic()
        if self.signame is None:
            self.signame, self._first = reason, now
            print(f"rank {self.rank}: {reason} received; finishing the current step, then saving a checkpoint "
                  "(send it again to exit at once)", file=sys.stderr, flush=True)
        elif now - self._first >= DUPLICATE_S:
            print(f"rank {self.rank}: second {reason}; exiting now without saving", file=sys.stderr, flush=True)
            os._exit(128 + getattr(signal, reason, signal.SIGTERM))

    def _watch_launcher(self) -> None:
        """Poll the parent (and, under the deepspeed launcher, its parent): a change means it died."""
        parent = os.getppid()
        if parent <= 1:
            return
        grand = _parent_of(parent) if "deepspeed.launcher.launch" in _cmdline(parent) else None
        while not self._stop.wait(WATCH_S):
            if os.getppid() != parent or (grand is not None and _parent_of(parent) != grand):
                self.request("SIGTERM")  # as if the dead launcher had forwarded it
                return

    def close(self) -> None:
        self._stop.set()
        for num, handler in self._previous.items():
            signal.signal(num, handler)
        self._previous.clear()
