"""Hang reports: a rank whose current phase (setup, a training step, validation, a checkpoint save) runs past
``log.hang_report_s`` says so, with every thread's Python stack, on stderr and in ``<log.dir>/hang_rank<R>.txt``.

A distributed hang is one rank somewhere else while its peers wait in a collective for it. The collective's own
timeout (30 min by default) then kills every rank with a message that names no culprit; this report comes first
and from every rank, so comparing the files shows who is stuck where: the odd one out is not inside the same
collective. The run is not interrupted (a step may just be slow), and when the phase ends the rank says how long
it took.

The reporter is a Python thread; it needs the GIL, which a rank blocked in a collective releases (torch releases it
around its ops and collective waits). It dumps the stacks while holding the GIL, so no frame changes under it. A
C-level timer (``faulthandler.dump_traceback_later``) was tried as a backstop and dropped: it reads frames
without the GIL, and firing on many short phases crashed a rank with SIGSEGV in CI.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from contextlib import contextmanager


def _fd_stream():
    """stderr if it is backed by a file descriptor (faulthandler writes to fds), else the process's original."""
    try:
        sys.stderr.fileno()
        return sys.stderr
    except (AttributeError, ValueError, OSError):
        return sys.__stderr__


class HangWatchdog:
    def __init__(self, limit_s: float, *, rank: int, where: str, log_dir: str | None):
        """``limit_s`` <= 0 disables it; ``where`` names the rank's place in the layout (e.g. "tp 1 pp 0 dp 3")."""
        self.limit_s = limit_s
        self.rank = rank
        self.where = where
        self.path = os.path.join(log_dir, f"hang_rank{rank}.txt") if log_dir else None
        self._phase: tuple[str, float] | None = None  # (name, monotonic start)
        self._reported: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if limit_s > 0:
            self._thread = threading.Thread(target=self._watch, name="megatrain-hang-watchdog", daemon=True)
            self._thread.start()

    @contextmanager
    def phase(self, name: str):
        if self._thread is None:
            yield
            return
        with self._lock:
            self._phase, self._reported = (name, time.monotonic()), None
        try:
            yield
        finally:
            with self._lock:
                (_, t0), reported = self._phase, self._reported
                self._phase, self._reported = None, None
            if reported:
                self._emit(f"megatrain: rank {self.rank} ({self.where}): {reported} finished after "
                           f"{time.monotonic() - t0:.1f}s\n", stacks=False)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        poll = min(max(self.limit_s / 4, 0.01), 1.0)
        while not self._stop.wait(poll):
            with self._lock:
                if self._phase is None or self._reported:
                    continue
                name, t0 = self._phase
                elapsed = time.monotonic() - t0
                if elapsed < self.limit_s:
                    continue
                self._reported = name
            self._emit(f"megatrain: rank {self.rank} ({self.where}) has been in {name} for {elapsed:.1f}s "
                       f"(log.hang_report_s={self.limit_s:g}; the run goes on). A rank waiting in a collective "
                       f"is waiting for a peer: the rank whose stack is elsewhere is the one holding it up. "
                       f"Python stacks of this rank's threads:\n", stacks=True)

    def _emit(self, text: str, *, stacks: bool) -> None:
        targets = [_fd_stream()]
        f = None
        if self.path:
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                f = open(self.path, "a")
                targets.append(f)
            except OSError:
                pass
        try:
            for t in targets:
                t.write(text)
                t.flush()
                if stacks:
                    faulthandler.dump_traceback(file=t, all_threads=True)
                    t.flush()
        finally:
            if f is not None:
                f.close()
