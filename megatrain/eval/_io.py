"""Small file helpers shared by the evaluation tools."""
from __future__ import annotations

import json
import os


def is_main_process() -> bool:
    """Rank 0 of an initialised process group, or the only process; only it writes tables and results."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)  # a crash mid-write never leaves a half result that a resume would take as finished


def write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
