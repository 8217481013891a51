"""The kernels a model runs: the ops bound to one KernelPolicy.

Modules of a model call ``self.kernels.<op>(...)``; the class default is the default policy, so a plain model
works as built, and the kernels transform (:func:`use_kernels`, step 1 of ``parallelize``) gives every module the
run's own ``Kernels``. No process-wide switch is flipped, so two models with different policies can live in one
process, and the planner counts a forward by handing the model a ``Kernels`` whose attention it wrote (instead of
patching the ops module).
"""
from __future__ import annotations

from torch import nn

from megatrain.ops.activations import swiglu
from megatrain.ops.attention import attention
from megatrain.ops.cross_entropy import cross_entropy, fused_linear_cross_entropy, vocab_parallel_cross_entropy
from megatrain.ops.norms import layer_norm, rms_norm
from megatrain.ops.rope import apply_rope, rope_cache
from megatrain.ops.policy import KernelPolicy


class Kernels:
    def __init__(self, policy: KernelPolicy | None = None):
        self.policy = policy  # None: the default policy (megatrain.ops.configure)

    def layer_norm(self, x, weight, bias, eps=1e-5):
        return layer_norm(x, weight, bias, eps, policy=self.policy)

    def rms_norm(self, x, weight, eps=1e-6):
        return rms_norm(x, weight, eps, policy=self.policy)

    def attention(self, q, k, v, causal=True, window=None, **masks):
        """``masks``: ``segments`` / ``key_segments`` / ``q_offset`` (megatrain.ops.attention.attention)."""
        return attention(q, k, v, causal, window, policy=self.policy, **masks)

    def apply_rope(self, q, k, cos, sin, *, inplace=False):
        return apply_rope(q, k, cos, sin, inplace=inplace, policy=self.policy)

    def rope_cache(self, *args, **kwargs):
        return rope_cache(*args, **kwargs)

    def swiglu(self, gate, up):
        return swiglu(gate, up, policy=self.policy)

    def cross_entropy(self, logits, labels, **kwargs):
        return cross_entropy(logits, labels, policy=self.policy, **kwargs)

    def fused_linear_cross_entropy(self, hidden, weight, labels, **kwargs):
        return fused_linear_cross_entropy(hidden, weight, labels, policy=self.policy, **kwargs)

    def vocab_parallel_cross_entropy(self, local_logits, labels, group, **kwargs):
        return vocab_parallel_cross_entropy(local_logits, labels, group, policy=self.policy, **kwargs)


DEFAULT_KERNELS = Kernels()


def use_kernels(model: nn.Module, kernels: Kernels) -> int:
    """Give every module of ``model`` that calls ops (has a ``kernels`` attribute) these kernels; returns how many."""
    n = 0
    for module in model.modules():
        if isinstance(getattr(module, "kernels", None), Kernels):
            module.kernels = kernels
            n += 1
    return n
