"""Counts the payload bytes of every torch.distributed collective / p2p call made by this process.

Enabled with ``MEGATRAIN_COUNT_COMM=1`` (the trainer then logs ``comm_bytes`` per step). It wraps the
torch.distributed functions before DeepSpeed binds them, so ZeRO's, the pipeline engine's and
megatrain's tensor-parallel traffic are all seen. Payload = bytes of the tensor(s) handed to the call;
a ring all-reduce moves about 2·(n-1)/n × payload per rank on the wire.
"""
from __future__ import annotations

import functools
import os
from collections import Counter

import torch
import torch.distributed as dist

COUNTS: Counter = Counter()
_PATCHED = False


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


# op name -> which positional argument carries the payload
_OPS = {"all_reduce": 0, "broadcast": 0, "all_gather": 1, "all_gather_into_tensor": 1, "reduce_scatter": 1,
        "reduce_scatter_tensor": 1, "send": 0, "recv": 0, "isend": 0, "irecv": 0, "all_to_all_single": 1,
        "all_gather_object": -1, "reduce": 0}


def enable() -> None:
    global _PATCHED
    if _PATCHED:
        return
    _PATCHED = True
    for name, arg in _OPS.items():
        fn = getattr(dist, name, None)
        if fn is None or arg < 0:
            continue

        @functools.wraps(fn)
        def wrapper(*args, __fn=fn, __name=name, __arg=arg, **kwargs):
            if dist.get_world_size() > 1:  # a one-rank "collective" moves nothing
                payload = args[__arg] if len(args) > __arg else next(iter(kwargs.values()), None)
                COUNTS[__name] += _nbytes(payload)
            return __fn(*args, **kwargs)

        setattr(dist, name, wrapper)


def enabled_by_env() -> bool:
    return os.environ.get("MEGATRAIN_COUNT_COMM", "0") == "1"


def take() -> int:
    """Bytes counted since the last call (all ops), and reset."""
    total = sum(COUNTS.values())
    COUNTS.clear()
    return total
