"""Build modules without torch's default parameter init, for models whose every parameter is set afterwards.

``nn.Linear`` and ``nn.Embedding`` fill their weights in ``reset_parameters`` (kaiming-uniform, normal). megatrain
overwrites every parameter right after (``init_weights``, a checkpoint, or a rank's shard at materialisation), so
that fill is wasted work: for a billion-parameter model it is a second full random init. On the meta device torch
has no kernel for ``normal_`` and decomposes it through ``torch._refs``, whose wrapper imports ``torch._dynamo``
(about 2 s on a 2-core machine) for tensors that hold no data. A training rank still pays that import once, when
its optimizer is built: torch 2.13's ``Optimizer.add_param_group`` is wrapped in ``torch._disable_dynamo``.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

# The in-place random fills. A mode sees the outermost overridable call and not what that call runs inside it, so
# both torch.nn.init's overridable entry points (uniform_, normal_, kaiming_uniform_: what nn.Linear and
# nn.Embedding call) and the Tensor methods the other init functions end in are listed. Deterministic fills
# (ones_, zeros_, fill_) are cheap and left to run.
_RANDOM_FILLS = frozenset({torch.nn.init.uniform_, torch.nn.init.normal_, torch.nn.init.kaiming_uniform_,
                           torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.random_,
                           torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.log_normal_,
                           torch.Tensor.cauchy_, torch.Tensor.bernoulli_})


class skip_random_init(TorchFunctionMode):
    """``with skip_random_init(): model = Model(cfg)``: every in-place random fill during construction is a no-op,
    so parameters keep whatever ``torch.empty`` gave them (nothing, on meta). The caller must set every parameter
    afterwards; ``build_transformer`` does (tests/unit/test_deferred_init.py checks no value is left unset)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RANDOM_FILLS:  # torch.nn.init passes its tensor by keyword, a Tensor method as self
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))
