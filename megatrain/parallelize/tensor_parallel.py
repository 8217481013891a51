"""Tensor (and sequence) parallelism as a transform over a built Transformer.

Attention: q column-parallel (query heads split), o row-parallel; k/v by the rule of :func:`kv_layout`:
- tp divides the kv heads: column-parallel (GQA groups stay whole);
- tp a multiple of the kv heads: each kv head replicated on tp/kv consecutive ranks, as Megatron does (a rank's
  query heads all use its one kv head; the copies' gradients are summed so they stay equal);
- neither (3 kv heads at tp=2 or 4): k/v kept whole on every rank (:class:`ReplicatedKVProjection`), each rank
  computing the kv heads its own query heads use, one per query head; the gradients are summed over tp.
MLP: gate/up column, down row. Token embedding and LM head split along the vocabulary,
padded to a multiple of tp (the loss masks the padding). With sequence parallelism the residual stream
between blocks is split along the sequence: column layers all-gather it, row layers reduce-scatter back,
and replicated parameters that then see different tokens per rank (norms, row biases) get their gradients
all-reduced over tp.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatrain.config.schema import Config
from megatrain.distributed.collectives import copy_to_group, gather_for_group, split_to_group
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


def kv_layout(kv_heads: int, tp: int) -> str:
    """How tp holds the k/v projections: "split" (tp divides the kv heads), "replicated_heads" (tp a multiple of
    them: one kv head per rank) or "whole" (neither: every rank holds all kv heads). The planner counts by it."""
    if kv_heads % tp == 0:
        return "split"
    return "replicated_heads" if tp % kv_heads == 0 else "whole"


def kv_weight_heads(kv_heads: int, tp: int) -> int:
    """kv heads whose k/v weights one tp rank holds (the planner's parameter count)."""
    return {"split": kv_heads // tp, "replicated_heads": 1, "whole": kv_heads}[kv_layout(kv_heads, tp)]


def local_kv_heads(kv_heads: int, q_heads: int, tp: int) -> int:
    """kv heads one tp rank's attention sees: under "whole" one per local query head (see ReplicatedKVProjection)."""
    return {"split": kv_heads // tp, "replicated_heads": 1, "whole": q_heads // tp}[kv_layout(kv_heads, tp)]


class ReplicatedKVProjection(nn.Module):
    """A k or v projection whose kv heads tp cannot split evenly (3 kv heads at tp=2: a rank's query heads use
    parts of two kv groups). The weight stays whole on every tp rank (a replicated parameter: its ParamSpec has
    no tp split, so checkpoints and exports see the one full tensor); each rank computes only the kv heads its
    query heads use and repeats each once per query head using it, so the attention sees as many kv heads as
    query heads (group size 1) and needs no change. Each rank's weight gradient covers only its query heads'
    use, so the copies' gradients are summed over tp (``mark_replicated_grads``) and stay equal.

    Cost against a split projection: the k/v weights (and their optimizer state) are held tp times, and the
    local k/v activations have q_heads/tp heads instead of kv_heads/tp.

    (B, T, H) — or (B, T/tp, H) under sequence parallelism — → (B, T, q_heads/tp * D)."""

    def __init__(self, linear: nn.Linear, *, kv_heads: int, q_heads: int, group, sequence_parallel: bool = False):
        super().__init__()
        n, r = dist.get_world_size(group), dist.get_rank(group)
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight, self.bias = linear.weight, linear.bias  # the same (tagged) parameters: whole, replicated
        self.head_dim = linear.weight.shape[0] // kv_heads
        per_rank, group_size = q_heads // n, q_heads // kv_heads  # query heads per rank, per kv head
        mine = range(r * per_rank, (r + 1) * per_rank)  # this rank's query heads (q_proj's column split)
        self.first = mine[0] // group_size  # the first kv head they use
        last = mine[-1] // group_size
        # (kv head relative to ``first``, how many of this rank's query heads use it), in query-head order
        self.uses = tuple((h - self.first, sum(1 for q in mine if q // group_size == h))
                          for h in range(self.first, last + 1))

    @property
    def rows(self) -> slice:
        """Output rows of the whole weight that this rank computes: the kv heads its queries use."""
        return slice(self.first * self.head_dim, (self.first + len(self.uses)) * self.head_dim)

    def gather_input(self, x: torch.Tensor) -> torch.Tensor:
        return gather_for_group(x, self.group, dim=1) if self.sequence_parallel else copy_to_group(x, self.group)

    def expand_heads(self, y: torch.Tensor) -> torch.Tensor:
        """(B, T, k*D) for the k kv heads in ``rows`` -> (B, T, q_heads/tp * D): query head i's kv head at slot i."""
        y = y.unflatten(-1, (len(self.uses), self.head_dim))  # (B, T, k, D)
        heads = [y[:, :, h:h + 1].expand(-1, -1, count, -1) for h, count in self.uses]
        return torch.cat(heads, dim=2).flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, rows = self.gather_input(x), self.rows
        return self.expand_heads(F.linear(x, self.weight[rows], None if self.bias is None else self.bias[rows]))

    def extra_repr(self) -> str:
        return f"kv heads {self.first}..{self.first + len(self.uses) - 1} used {[c for _, c in self.uses]} times"


def _column_kv(linear: nn.Linear, *, heads: int, q_heads: int, tp: int, group, **kw) -> nn.Module:
    """k/v projection by :func:`kv_layout`: split by head; each head repeated tp/heads times, then split; or whole."""
    layout = kv_layout(heads, tp)
    if layout == "split":
        return _column(linear, group=group, **kw)
    if layout == "whole":
        layer = ReplicatedKVProjection(linear, kv_heads=heads, q_heads=q_heads, group=group, **kw)
        mark_replicated_grads([layer.weight, layer.bias], group, tp)  # one slice (the whole) held by all tp ranks
        return layer
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
        kv = dict(heads=cfg.model.kv_heads, q_heads=cfg.model.num_heads, tp=dims.tp)
        attn.k_proj = _column_kv(attn.k_proj, **kv, **col)
        attn.v_proj = _column_kv(attn.v_proj, **kv, **col)
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
