"""Small file helpers shared by the evaluation tools."""
from __future__ import annotations

import json

from megatrain.fsutil import atomic_write_text


def write_json(path: str, obj) -> None:
    # atomic (temp + fsync + rename): a crash mid-write never leaves a half result that a resume would take
    # as finished
    atomic_write_text(path, json.dumps(obj, indent=2))


def write_text(path: str, text: str) -> None:
    atomic_write_text(path, text)
