"""Op dispatch: every hot op the models use goes through here.

Backends per op: ``triton`` (fused Triton kernels, CUDA tensors), ``cuda`` (C++/CUDA extensions from
csrc/ when built), ``torch`` (plain-torch reference; always available, the CPU path). ``auto`` picks torch
unless a committed benchmark record proves a kernel faster here (ops/policy.py). A run's KernelPolicy comes from
``model.kernels`` / ``model.kernel_overrides`` and is passed in: to the model by the kernels transform
(``ops.kernels.use_kernels``), to the loss and to the optimizer. :func:`configure` sets only the default that
ops called without a policy use (benchmarks, tests, scripts).
"""
from __future__ import annotations

from megatrain.ops.dispatch import available_backends, backend_for, configure, current_config
from megatrain.ops.norms import layer_norm, rms_norm
from megatrain.ops.attention import attention
from megatrain.ops.activations import swiglu
from megatrain.ops.rope import apply_rope, rope_cache
from megatrain.ops.cross_entropy import cross_entropy

__all__ = [
    "apply_rope", "attention", "available_backends", "backend_for", "configure", "cross_entropy",
    "current_config", "layer_norm", "rms_norm", "rope_cache", "swiglu",
]

from megatrain.ops.adamw import make_adamw  # noqa: E402,F401  (public: megatrain.ops.make_adamw)

# C++/CUDA providers register themselves when the extension module is importable.
try:  # noqa: SIM105
    import megatrain.ops.extensions  # noqa: F401,E402
except ImportError:
    pass
