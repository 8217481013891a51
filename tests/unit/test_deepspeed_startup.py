"""DeepSpeed's Muon module (imported by every ZeRO engine) no longer loads torch.compile's machinery at import:
its torch.compile decorators compile on first call instead (megatrain.distributed.deepspeed_startup)."""
import os
import subprocess
import sys

import torch

from megatrain.distributed.deepspeed_startup import _lazy_torch_compile
from megatrain.testing import ROOT


def _python(code: str) -> list[str]:
    """The words of the last line ``code`` prints (DeepSpeed may print its own lines first)."""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ROOT}).stdout
    return out.strip().splitlines()[-1].split()


def test_a_zero_engines_muon_import_loads_no_compiler_after_init_distributed():
    # init_distributed is every launch's first step (a one-rank group here); then what DeepSpeed's engine does
    code = ("import sys; from megatrain.distributed.env import init_distributed; init_distributed(); "
            "from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam; "
            "from deepspeed.runtime.zero.muon import original_muon as m; "
            "print('torch._inductor' in sys.modules, 'torch._dynamo' in sys.modules, "
            "getattr(m.zeropower_via_newtonschulz5, 'deferred_compile', False))")
    assert _python(code) == ["False", "False", "True"]


def test_without_the_hook_deepspeed_loads_the_compiler():
    # the cost the hook removes is real in this DeepSpeed: if this starts failing, DeepSpeed fixed it itself
    code = ("import sys; import deepspeed; from deepspeed.runtime.zero.muon import original_muon; "
            "print('torch._inductor' in sys.modules)")
    assert _python(code) == ["True"]


def test_the_lazy_decorator_compiles_once_on_first_call_with_its_arguments(monkeypatch):
    compiled = []
    real_compile = torch.compile

    def recording_compile(fn, **kw):
        compiled.append((fn, kw))
        return real_compile(fn, **kw)

    monkeypatch.setattr(torch, "compile", recording_compile)

    def f(x):
        return x * 2 + 1

    lazy = _lazy_torch_compile(backend="eager")(f)  # the @compile(**kw) form
    assert lazy.__name__ == "f" and lazy.deferred_compile and compiled == []
    x = torch.arange(4.0)
    torch.testing.assert_close(lazy(x), f(x))
    torch.testing.assert_close(lazy(x + 1), f(x + 1))
    assert compiled == [(f, {"backend": "eager"})]
    plain = _lazy_torch_compile(f)  # the bare @compile form
    assert plain.__wrapped__ is f and len(compiled) == 1
