"""Pipeline split: the (possibly tensor-parallel) Transformer → DeepSpeed PipelineModule stages.

Layer sequence: [token table] [positions + dropout] [block 0 .. block L-1] [final norm] [LM head].

Packed rows: the first stage takes (input_ids, positions, segments) instead of input_ids; the token table and
the positions layer hand on (h, positions, segments), every block takes and returns that tuple (its own forward
is wrapped on the instance, so parameter names do not change), and the final norm drops the two integer tensors
(each wrapped on the instance: the layer list is the one plan/params.py mirrors).
DeepSpeed sends such tuples between stages as they are and sends gradients back only for the floating tensor
(the integer ones never require grad), so every stage's blocks see the document boundaries.
With tied embeddings the token table and the LM head are one ``TiedLayerSpec`` (key "tokens"): DeepSpeed
keeps a copy on the first and the last stage, broadcasts it at start and all-reduces its gradient between
the two. Stages are balanced by parameter count or uniformly (parallel.pipeline_partition); 1F1B
scheduling, activation send/recv and micro-batch accumulation are DeepSpeed's.
"""
from __future__ import annotations

from torch import nn

from megatrain.config.schema import Config
from megatrain.parallelize.param_spec import update_spec


class TokenTable(nn.Module):
    """Token embedding + the LM head sharing its weight (tied): one pipeline layer, two entry points.
    Built by LayerSpec from the already-initialised modules, so every stage starts from the same values."""

    def __init__(self, wte: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.wte, self.lm_head = wte, lm_head

    def forward(self, inputs):  # (B, T) -> (B, T, H); (ids, positions, segments) -> (h, positions, segments)
        return _with_extras(self.wte, inputs)


def _with_extras(fn, inputs):
    """fn on the hidden state, the packing tensors (positions, segments) passed on unchanged."""
    if isinstance(inputs, tuple):
        x, *extras = inputs
        return (fn(x), *extras)
    return fn(inputs)


def _first_layer(wte: nn.Module) -> nn.Module:
    """The untied token embedding, taking a packed tuple too (forward replaced on the instance: same names)."""
    inner = wte.forward
    wte.forward = lambda inputs: _with_extras(inner, inputs)
    return wte


def _pipeline_block(block: nn.Module) -> nn.Module:
    """A block that takes and returns (h, positions, segments) for packed rows, or h alone."""
    inner = block.forward  # maybe already the activation-checkpointed forward

    def forward(inputs):
        if isinstance(inputs, tuple):
            h, positions, segments = inputs
            return inner(h, positions, segments, None), positions, segments  # (B, T[/tp], H), (B, T), (B, T)
        return inner(inputs)

    block.forward = forward
    return block


def _final_norm(norm: nn.Module) -> nn.Module:
    """The final norm drops (positions, segments): the LM head and the loss take h alone. Wrapped rather than
    a layer of its own, so the layer list (and the planner's stage cut, plan/params.py) stays the same."""
    inner = norm.forward
    norm.forward = lambda inputs: inner(inputs[0] if isinstance(inputs, tuple) else inputs)
    return norm


def _project(table: TokenTable, h):  # (B, T, H) -> (B, T, V or V/tp)
    return table.lm_head(h)


class PositionsAndDropout(nn.Module):
    def __init__(self, embed: nn.Module):
        super().__init__()
        embed.wte = None  # the token table is its own layer; keep its parameters in one place
        self.embed = embed

    def forward(self, inputs):  # (B, T, H) -> (B, T, H), or (B, T/tp, H) under sequence parallelism
        if isinstance(inputs, tuple):  # packed: learned positions restart per document
            h, positions, segments = inputs
            return self.embed.add_positions(h, positions), positions, segments
        return self.embed.add_positions(inputs)


def to_pipeline_module(model: nn.Module, cfg: Config, dims, loss_fn):
    from deepspeed.pipe import PipelineModule, TiedLayerSpec

    wte, lm_head = model.embed.wte, model.head.lm_head
    if cfg.model.tied:
        update_spec(wte.weight, pipeline_tied=True)  # held by the first and last stage; checkpoints write it once
        first = TiedLayerSpec("tokens", TokenTable, wte, lm_head, tied_weight_attr="wte.weight")
        last = TiedLayerSpec("tokens", TokenTable, wte, lm_head, forward_fn=_project, tied_weight_attr="wte.weight")
    else:
        first, last = _first_layer(wte), lm_head
    blocks = [_pipeline_block(block) for block in model.layers]
    layers = [first, PositionsAndDropout(model.embed), *blocks, _final_norm(model.head.norm), last]
    return PipelineModule(layers=layers, topology=dims.topology, loss_fn=loss_fn,
                          partition_method="parameters" if cfg.parallel.pipeline_partition == "parameters" else "uniform",
                          activation_checkpoint_interval=0)
