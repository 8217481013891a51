"""Tensor (and sequence) parallelism as a transform over a built Transformer.

Attention: q/k/v column-parallel (query and kv heads split; GQA groups stay whole since kv heads divide by
tp), o row-parallel. When tp exceeds the kv heads (tp a multiple of them), each kv head is replicated on
tp/kv consecutive ranks, as Megatron does: a rank's query heads all use its one kv head, and the copies'
gradients are summed so they stay equal. MLP: gate/up column, down row. Token embedding and LM head split along the vocabulary,
padded to a multiple of tp (the loss masks the padding). With sequence parallelism the residual stream
between blocks is split along the sequence: column layers all-gather it, row layers reduce-scatter back,
and replicated parameters that then see different tokens per rank (norms, row biases) get their gradients
all-reduced over tp.
"""
from __future__ import annotations

import math

import torch.distributed as dist
from torch import nn

from megatrain.config.schema import Config
from megatrain.distributed.collectives import split_to_group
from megatrain.distributed.tp_layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatrain.parallelize.param_spec import inherit_spec, update_spec
from megatrain.parallelize.sequence_parallel import mark_replicated_grads, mark_sequence_parallel_grads


def padded_vocab_size(vocab: int, tp: int) -> int:
    return math.ceil(vocab / tp) * tp


def _split_sequence_after_embedding(embed: nn.Module, group) -> None:
    inner = embed.add_positions  # the last step of the embedding, in the plain and the pipelined model

    def add_positions(*args):
        return split_to_group(inner(*args), group, dim=1)  # (B, T, H) -> (B, T/tp, H)

    embed.add_positions = add_positions


def _column(linear: nn.Linear, *, pad_out_to: int | None = None, **kw) -> ColumnParallelLinear:
    layer = ColumnParallelLinear.from_linear(linear, pad_out_to=pad_out_to, **kw)
    inherit_spec(layer.weight, linear.weight, tp_dim=0, tp_padded=pad_out_to)
    if layer.bias is not None:
        inherit_spec(layer.bias, linear.bias, tp_dim=0, tp_padded=pad_out_to)
    return layer


def _column_kv(linear: nn.Linear, *, heads: int, tp: int, group, **kw) -> ColumnParallelLinear:
    """k/v projection: split by head, or (tp > heads) each head repeated tp/heads times, then split."""
    if tp <= heads:
        return _column(linear, group=group, **kw)
    rep = tp // heads
    w, b = linear.weight.detach(), linear.bias

    def widen(t):  # (heads*D, ...) -> (heads*rep*D, ...): head h at rows of ranks h*rep .. h*rep+rep-1
        return t.reshape(heads, -1, *t.shape[1:]).repeat_interleave(rep, 0).reshape(heads * rep * (t.shape[0] // heads), *t.shape[1:])
    layer = ColumnParallelLinear(widen(w), widen(b.detach()) if b is not None else None, group=group, **kw)
    for new, old in ((layer.weight, linear.weight), (layer.bias, b)):
        if new is not None:
            inherit_spec(new, old, tp_dim=0)
            update_spec(new, tp_replicas=rep)
            # DeepSpeed's grad norm counts a model-parallel parameter on every tp rank and any other on tp
            # rank 0 only: marking just the first copy of each head counts every head once
            new.model_parallel = new.tensor_model_parallel = dist.get_rank(group) % rep == 0
    mark_replicated_grads([layer.weight, layer.bias], group, rep)
    return layer


def _row(linear: nn.Linear, **kw) -> RowParallelLinear:
    layer = RowParallelLinear.from_linear(linear, **kw)
    inherit_spec(layer.weight, linear.weight, tp_dim=1)
    if layer.bias is not None:
        inherit_spec(layer.bias, linear.bias, tp_dim=None)
    return layer


def apply_tensor_parallel(model: nn.Module, cfg: Config, dims) -> nn.Module:
    """Shard ``model`` in place over ``dims.tp_group`` (works on meta tensors: nothing is materialised)."""
    group, sp = dims.tp_group, cfg.parallel.sequence_parallel
    col = dict(group=group, sequence_parallel=sp)
    replicated_seen_by_shard = []  # parameters whose grads must be summed over tp under sp
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        attn.q_proj = _column(attn.q_proj, **col)
        kv = cfg.model.kv_heads
        attn.k_proj = _column_kv(attn.k_proj, heads=kv, tp=dims.tp, **col)
        attn.v_proj = _column_kv(attn.v_proj, heads=kv, tp=dims.tp, **col)
        if attn.q_norm is not None:  # shared over heads, but each rank normalises only its own heads
            mark_replicated_grads([attn.q_norm.weight, attn.k_norm.weight], group, dims.tp)
        attn.o_proj = _row(attn.o_proj, **col)
        if mlp.gate_proj is not None:
            mlp.gate_proj = _column(mlp.gate_proj, **col)
        mlp.up_proj = _column(mlp.up_proj, **col)
        mlp.down_proj = _row(mlp.down_proj, **col)
        replicated_seen_by_shard += [block.attn_norm.weight, block.attn_norm.bias, block.mlp_norm.weight,
                                     block.mlp_norm.bias, attn.o_proj.bias, mlp.down_proj.bias]
    vocab = cfg.model.vocab_size
    padded = padded_vocab_size(vocab, dims.tp)
    old_wte = model.embed.wte.weight
    model.embed.wte = VocabParallelEmbedding(old_wte, group=group, padded_vocab=padded)
    inherit_spec(model.embed.wte.weight, old_wte, tp_dim=0, tp_padded=padded)
    head = model.head
    if cfg.model.tied:
        head.lm_head = ColumnParallelLinear.tied_to(model.embed.wte, sequence_parallel=sp)
    else:
        head.lm_head = _column(head.lm_head, pad_out_to=padded, **col)
    if sp:
        _split_sequence_after_embedding(model.embed, group)
        replicated_seen_by_shard += [head.norm.weight, head.norm.bias]
        mark_sequence_parallel_grads(replicated_seen_by_shard, group)
    return model
