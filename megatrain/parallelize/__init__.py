"""Transforms over a built (pure) model, applied in one documented order by :func:`parallelize`:

    kernels → tensor/sequence parallel → activation checkpointing → pipeline split → (ZeRO, by DeepSpeed)
"""
from megatrain.parallelize.apply import parallelize

__all__ = ["parallelize"]
