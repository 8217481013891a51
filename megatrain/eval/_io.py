"""Small file helpers shared by the evaluation tools."""
from __future__ import annotations

import json

from megatrain.fsutil import atomic_write_text


def is_main_process() -> bool:
    """Rank 0 of an initialised process group, or the only process; only it writes tables and results."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def write_json(path: str, obj) -> None:
    # atomic (temp + fsync + rename): a crash mid-write never leaves a half result that a resume would take
    # as finished
    atomic_write_text(path, json.dumps(obj, indent=2))


def write_text(path: str, text: str) -> None:
    atomic_write_text(path, text)
