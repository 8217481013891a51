"""Activation bytes one micro-batch leaves for the backward, counted by running the model on the meta device.

Nothing is computed or allocated: the forward runs on shapes only, and ``saved_tensors_hooks`` sees every tensor
autograd keeps, each storage counted once (views share it). What is counted is what this code base's torch
reference ops save (norms keep fp32 statistics; the Triton kernels keep less), with one exception: attention is
counted as a flash kernel keeps it (q, k, v, output, log-sum-exp; no T×T matrix), which is what every real
backend does (Triton, CUDA SDPA, and CPU SDPA too); on meta, SDPA would pick the math path and keep T×T.

Tensor parallelism is counted on the rank's own shapes: a model with heads, kv heads and MLP channels divided by
tp is exactly one tp rank's compute. Sequence parallelism divides what the norms, dropout and the residual stream
keep (attributed by module) by tp; a column-parallel layer keeps its gathered (full-sequence) input, as ours does.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatrain.config.schema import ModelConfig


@dataclass
class ActivationBytes:
    per_block: int  # one block, one micro-batch, this rank
    checkpointed_block: int  # a block under activation checkpointing: its input only
    embed: int  # embedding and position lookups
    head: int  # final norm, LM head and the loss (fp32 log-softmax over this rank's vocabulary shard)


class _FlashLikeAttention(torch.autograd.Function):
    """Shape stand-in for attention that saves what a flash kernel saves."""

    @staticmethod
    def forward(ctx, q, k, v, mask=None):  # q: (B, Hq, T, D), k/v: (B, Hkv, T, D), mask: (B, 1, T, S) bool
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)  # (B, Hq, T)
        ctx.save_for_backward(q, k, v, out, lse, *(() if mask is None else (mask,)))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the meta forward only counts
        raise RuntimeError("shape stand-in")


@contextmanager
def _count_saved(counts: dict, region: list, params: set):
    """Add the bytes of what autograd saves inside the block to ``counts[region]``; weights (saved by every
    linear, but already counted as parameters) are left out."""
    seen: dict[int, tuple[int, str]] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:
            seen.setdefault(st._cdata, (st.nbytes(), region[-1]))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    for nbytes, where in seen.values():
        counts[where] = counts.get(where, 0) + nbytes


def _local_shapes(m: ModelConfig, tp: int) -> ModelConfig:
    """One tp rank's shapes: heads, kv heads, MLP channels and the padded vocabulary divided by tp."""
    from megatrain.parallelize.tensor_parallel import local_kv_heads, padded_vocab_size
    return m.model_copy(update={"num_heads": m.num_heads // tp, "num_kv_heads": local_kv_heads(m.kv_heads, m.num_heads, tp),
                                "head_dim": m.attn_head_dim, "ffn_hidden_size": m.ffn_size // tp,
                                "vocab_size": padded_vocab_size(m.vocab_size, tp) // tp, "init_from": None,
                                "from_hf": None})


def activation_bytes(m: ModelConfig, *, micro_batch: int, seq_len: int, tp: int = 1, sequence_parallel: bool = False,
                     dtype: torch.dtype = torch.float32, repeat_kv: bool = False, packed: bool = False) -> ActivationBytes:
    """``repeat_kv``: the attention backend is the torch reference, which repeats GQA's kv heads up to the query
    heads before SDPA, so the repeated k and v are what is kept (the Triton kernel reads the kv heads in place).
    ``packed``: rows of packed documents (positions and segments reach the blocks; the reference then keeps its
    (B, 1, T, T) document mask, the kernel nothing more)."""
    return _activation_bytes(m.model_dump_json(), micro_batch, seq_len, tp, sequence_parallel, dtype, repeat_kv,
                             packed)


@functools.lru_cache(maxsize=256)  # the layout search asks for the same shapes many times
def _activation_bytes(model_json: str, micro_batch: int, seq_len: int, tp: int, sequence_parallel: bool,
                      dtype: torch.dtype, repeat_kv: bool, packed: bool = False) -> ActivationBytes:
    m = ModelConfig.model_validate_json(model_json)
    from megatrain.ops.kernels import Kernels, use_kernels
    from megatrain.plan.params import meta_model
    local = meta_model(_local_shapes(m, tp)).to(dtype)
    local.train()
    params = {p.untyped_storage()._cdata for p in local.parameters()}
    region = ["other"]
    counts: dict[str, int] = {}
    block = local.layers[0]
    for name, mod in (("norm", block.attn_norm), ("norm", block.mlp_norm), ("norm", block.dropout)):
        mod.register_forward_pre_hook(lambda _m, _a, n=name: region.append(n))  # hooks must return None:
        mod.register_forward_hook(lambda _m, _a, _o: region.pop() and None)  # a value would replace the output

    class CountingKernels(Kernels):
        def attention(self, q, k, v, causal=True, window=None, *, segments=None, key_segments=None,
                      q_offset=None):  # counts the fused kernel; a window < T runs the masked torch reference,
            # which also keeps the (T, T) scores: the plan is low for such runs. Document masks (segments) cost
            # the kernel nothing it keeps beyond the ids; the torch reference keeps its (B, 1, T, S) mask (in q's dtype).
            if repeat_kv and q.shape[1] != k.shape[1]:
                k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
            if segments is not None and repeat_kv:
                keys = segments if key_segments is None else key_segments
                # SDPA turns the bool mask into an additive one in q's dtype and keeps that (B, 1, T, S)
                mask = (segments[:, None, :, None] == keys[:, None, None, :]).to(q.dtype)
                return _FlashLikeAttention.apply(q, k, v, mask)
            return _FlashLikeAttention.apply(q, k, v)
    use_kernels(local, CountingKernels())  # this model's kernels only: nothing process-wide is patched
    ids = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")
    with torch.device("meta"):
        with _count_saved(counts, region, params):
            region.append("embed")
            h = local.embed(ids)
            region.pop()
        embed = counts.pop("embed", 0)
        with _count_saved(counts, region, params):
            if packed:  # (B, T) positions and document ids, as a packed batch hands them to every block
                h = block(h, torch.zeros_like(ids), torch.zeros_like(ids), None)
            else:
                h = block(h)
        with _count_saved(head := {}, ["head"], params):
            logits = local.head(h)
            F.cross_entropy(logits.float().view(-1, logits.shape[-1]), ids.view(-1))
    residual_stream = counts.get("norm", 0)
    shard = residual_stream // tp if sequence_parallel else residual_stream
    itemsize = torch.empty((), dtype=dtype).element_size()
    tokens = micro_batch * seq_len // (tp if sequence_parallel else 1)
    return ActivationBytes(per_block=counts.get("other", 0) + shard, checkpointed_block=tokens * m.hidden_size * itemsize,
                           embed=embed, head=head.get("head", 0))
