"""Keep torch.compile's import cost out of a rank's start-up when nothing is compiled.

DeepSpeed (0.19) imports its Muon optimizer while building any ZeRO engine — the optimizer sanity check and
ZeRO-1/2's gradient averaging do ``from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam``,
whatever optimizer the run uses — and that module decorates three functions with ``torch.compile`` at import.
Decorating imports ``torch._dynamo`` and ``torch._inductor``: 2.4 s of a 12.6 s one-rank start under cProfile
on the demo, for kernels that only a Muon run ever calls (benchmarks/bench_startup.py measures the start; README
"Against the peers" has the figures).

``defer_deepspeed_compile`` makes DeepSpeed's ``compiler.compile()`` decorator lazy: the function is handed to
``torch.compile`` on its first call, with the same arguments, so a Muon run compiles exactly what it did before,
one call later. It must run before DeepSpeed first imports that module (``init_distributed`` calls it right
after importing DeepSpeed). If DeepSpeed renames the hook, nothing is patched and the start is only slower;
tests/unit/test_deepspeed_startup.py fails then, since it checks that building a ZeRO engine imports no dynamo.
"""
from __future__ import annotations

import functools
import sys

import torch

_MUON_MODULE = "deepspeed.runtime.zero.muon.original_muon"


def _lazy_torch_compile(fn=None, **compile_kwargs):
    """``torch.compile`` with the same call forms (``@compile``, ``@compile(**kw)``, ``compile(fn, **kw)``) that
    compiles on the first call instead of at decoration."""
    if fn is None:
        return functools.partial(_lazy_torch_compile, **compile_kwargs)
    compiled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, **compile_kwargs)
        return compiled(*args, **kwargs)

    call.deferred_compile = True  # what the test (and a curious user) can check
    return call


def defer_deepspeed_compile() -> bool:
    """Patch ``deepspeed.runtime.compiler.compile`` to hand out the lazy decorator; True if it now does. Idempotent;
    a no-op once DeepSpeed's Muon module is imported (its functions are decorated already)."""
    try:
        from deepspeed.runtime import compiler
    except ImportError:
        return False
    current = getattr(compiler, "compile", None)
    if getattr(current, "defers_compile", False):
        return True
    if current is None or _MUON_MODULE in sys.modules or not hasattr(torch, "compile"):
        return False

    def compile():  # DeepSpeed's signature: a factory that returns the decorator
        return _lazy_torch_compile

    compile.defers_compile = True
    compiler.compile = compile
    return True
