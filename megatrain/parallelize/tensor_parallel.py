"""Tensor (and sequence) parallelism as a transform over a built Transformer.

Attention: q/k/v column-parallel (query and kv heads split; GQA groups stay whole since kv heads divide by
tp), o row-parallel. MLP: gate/up column, down row. Token embedding and LM head split along the vocabulary,
padded to a multiple of tp (the loss masks the padding). With sequence parallelism the residual stream
between blocks is split along the sequence: column layers all-gather it, row layers reduce-scatter back,
and replicated parameters that then see different tokens per rank (norms, row biases) get their gradients
all-reduced over tp.
"""
from __future__ import annotations

import math

from torch import nn

from megatrain.config.schema import Config
from megatrain.dist.collectives import split_to_group
from megatrain.dist.tp_layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                      all_reduce_grads_over)


def padded_vocab_size(vocab: int, tp: int) -> int:
    return math.ceil(vocab / tp) * tp


def _split_sequence_after_embedding(embed: nn.Module, group) -> None:
    inner = embed.add_positions  # the last step of the embedding, in the plain and the pipelined model

    def add_positions(*args):
        return split_to_group(inner(*args), group, dim=1)  # (B, T, H) -> (B, T/tp, H)

    embed.add_positions = add_positions


def apply_tensor_parallel(model: nn.Module, cfg: Config, dims) -> nn.Module:
    group, sp = dims.tp_group, cfg.parallel.sequence_parallel
    col = dict(group=group, sequence_parallel=sp)
    replicated_seen_by_shard = []  # parameters whose grads must be summed over tp under sp
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        attn.q_proj = ColumnParallelLinear.from_linear(attn.q_proj, **col)
        attn.k_proj = ColumnParallelLinear.from_linear(attn.k_proj, **col)
        attn.v_proj = ColumnParallelLinear.from_linear(attn.v_proj, **col)
        attn.o_proj = RowParallelLinear.from_linear(attn.o_proj, **col)
        if mlp.gate_proj is not None:
            mlp.gate_proj = ColumnParallelLinear.from_linear(mlp.gate_proj, **col)
        mlp.up_proj = ColumnParallelLinear.from_linear(mlp.up_proj, **col)
        mlp.down_proj = RowParallelLinear.from_linear(mlp.down_proj, **col)
        replicated_seen_by_shard += [block.attn_norm.weight, block.attn_norm.bias, block.mlp_norm.weight,
                                     block.mlp_norm.bias, attn.o_proj.bias, mlp.down_proj.bias]
    vocab = cfg.model.vocab_size
    padded = padded_vocab_size(vocab, dims.tp)
    model.embed.wte = VocabParallelEmbedding(model.embed.wte.weight, group=group, padded_vocab=padded)
    head = model.head
    if cfg.model.tied:
        head.lm_head = ColumnParallelLinear.tied_to(model.embed.wte, sequence_parallel=sp)
    else:
        head.lm_head = ColumnParallelLinear.from_linear(head.lm_head, pad_out_to=padded, **col)
    if sp:
        _split_sequence_after_embedding(model.embed, group)
        replicated_seen_by_shard += [head.norm.weight, head.norm.bias]
        all_reduce_grads_over(replicated_seen_by_shard, group)
    return model
