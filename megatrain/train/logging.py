"""Run logging on rank 0: metrics.jsonl (one object per logged step), TensorBoard, console progress."""
from __future__ import annotations

import json
import os
import sys
import time


class RunLogger:
    """Writes ``<log.dir>/metrics.jsonl`` (fields: step, loss, lr, tokens_per_s, step_time_s, mfu (GPU,
    Transformer LMs), peak_mem_gib, ... and val_* on eval steps, and ``run``: which start of the run wrote it,
    listed in runs.jsonl), TensorBoard scalars and a progress display. Only rank 0 constructs an active logger."""

    def __init__(self, log_dir: str, *, total_steps: int, start_step: int, progress: str, tensorboard: bool,
                 active: bool):
        self.active = active
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self.total = total_steps
        self._tb = None
        self._bar = None
        self._last_print = 0.0
        if not active:
            return
        os.makedirs(log_dir, exist_ok=True)
        self._truncate_after(start_step)
        self.run = self._start_segment(log_dir, start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=os.path.join(log_dir, "tb"))
        self.progress = progress if (progress != "rich" or sys.stdout.isatty()) else "plain"
        if self.progress == "rich":
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
            self._bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, info="")
            self._bar.start()
        elif self.progress == "tqdm":
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records past the resumed step so the file is one clean curve."""
        if not os.path.isfile(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @staticmethod
    def _start_segment(log_dir: str, start_step: int) -> int:
        """Number this start of the run (1, 2, ... over resumes of one log.dir) and append it to runs.jsonl with
        the step it starts from; every metrics record carries it as ``run``, so a resume is a separate segment."""
        import socket
        path = os.path.join(log_dir, "runs.jsonl")
        starts = []
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                starts = [json.loads(line) for line in f if line.strip()]
        starts = [s for s in starts if s.get("start_step", 0) <= start_step] if start_step else []
        run = (starts[-1]["run"] + 1) if starts else 1
        starts.append({"run": run, "start_step": start_step, "host": socket.gethostname(), "pid": os.getpid(),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        from megatrain.fsutil import atomic_write_text
        atomic_write_text(path, "".join(json.dumps(s) + "\n" for s in starts))
        return run

    def rewind(self, step: int) -> None:
        """Drop records past ``step`` (a rollback re-runs those steps)."""
        if self.active:
            self._truncate_after(step)

    def log(self, record: dict) -> None:
        if not self.active:
            return
        record = {**record, "run": self.run}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        info = f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s"
        if "mfu" in record:
            info += f" mfu {100 * record['mfu']:.1f}%"
        if "peak_mem_gib" in record:
            info += f" mem {record['peak_mem_gib']:.2f} GiB"
        if "val_loss" in record:
            info += f" | val {record['val_loss']:.4f}"
        if self.progress == "rich":
            self._bar.update(self._task, completed=step, info=info)
        elif self.progress == "tqdm":
            self._bar.n = step
            self._bar.set_postfix_str(info)
        elif self.progress == "plain":
            now = time.monotonic()
            if now - self._last_print > 2.0 or step == self.total or "val_loss" in record:
                print(f"step {step}/{self.total} {info}", flush=True)
                self._last_print = now

    def message(self, text: str) -> None:
        if not self.active:
            return
        if self.progress == "rich" and self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.stop() if self.progress == "rich" else self._bar.close()
        if self._tb is not None:
            self._tb.close()
