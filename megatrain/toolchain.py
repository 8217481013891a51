"""The process environment DeepSpeed and the JIT builds read, set explicitly where a process starts training or
builds an op (``distributed.env.init_distributed``, ``ops.extensions.load``, ``megatrain.warmup``), never as a side
effect of importing megatrain."""
from __future__ import annotations

import os
import sys


def select_accelerator() -> None:
    """``DS_ACCELERATOR=cpu`` (gloo) when CUDA is absent, unless the user chose one. DeepSpeed 0.19 falls back to its
    CPU accelerator by itself; naming it keeps every rank and every DeepSpeed version on the same choice."""
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def pin_jit_toolchain() -> None:
    """One ninja and one build cache for every JIT build (DeepSpeed's shm comm op, megatrain's C++ AdamW).

    torch runs whichever ``ninja`` is first on PATH. An activated venv finds the venv's (1.13 here), a
    ``.venv/bin/python`` run or the deepspeed launcher's ranks find the system's (1.11); each reads the
    other's ``.ninja_log`` as "command line changed" and recompiles: 26–50 s startups instead of ~4 s.
    So when this interpreter's own bin/ holds a ninja, it goes first on PATH (children inherit it), and in
    a venv the cache defaults to ``<venv>/torch_extensions`` (what the Makefile exports) unless the user set
    TORCH_EXTENSIONS_DIR."""
    bindir = os.path.dirname(os.path.abspath(sys.executable))
    if os.access(os.path.join(bindir, "ninja"), os.X_OK):
        path = os.environ.get("PATH", "").split(os.pathsep)
        if path[0] != bindir:
            os.environ["PATH"] = os.pathsep.join([bindir, *[p for p in path if p and p != bindir]])
    if sys.prefix != sys.base_prefix:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def prepare_process() -> None:
    """Both, before deepspeed is imported or anything is built."""
    select_accelerator()
    pin_jit_toolchain()
