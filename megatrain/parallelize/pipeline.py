"""Pipeline split: the (possibly tensor-parallel) Transformer → DeepSpeed PipelineModule stages.

Layer sequence: [token table] [positions + dropout] [block 0 .. block L-1] [final norm] [LM head].
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

    def forward(self, input_ids):  # (B, T) -> (B, T, H)
        return self.wte(input_ids)


def _project(table: TokenTable, h):  # (B, T, H) -> (B, T, V or V/tp)
    return table.lm_head(h)


class PositionsAndDropout(nn.Module):
    def __init__(self, embed: nn.Module):
        super().__init__()
        embed.wte = None  # the token table is its own layer; keep its parameters in one place
        self.embed = embed

    def forward(self, h):  # (B, T, H) -> (B, T, H), or (B, T/tp, H) under sequence parallelism
        return self.embed.add_positions(h)


def to_pipeline_module(model: nn.Module, cfg: Config, dims, loss_fn):
    from deepspeed.pipe import PipelineModule, TiedLayerSpec

    wte, lm_head = model.embed.wte, model.head.lm_head
    if cfg.model.tied:
        update_spec(wte.weight, pipeline_tied=True)  # held by the first and last stage; checkpoints write it once
        first = TiedLayerSpec("tokens", TokenTable, wte, lm_head, tied_weight_attr="wte.weight")
        last = TiedLayerSpec("tokens", TokenTable, wte, lm_head, forward_fn=_project, tied_weight_attr="wte.weight")
    else:
        first, last = wte, lm_head
    layers = [first, PositionsAndDropout(model.embed), *model.layers, model.head.norm, last]
    return PipelineModule(layers=layers, topology=dims.topology, loss_fn=loss_fn,
                          partition_method="parameters" if cfg.parallel.pipeline_partition == "parameters" else "uniform",
                          activation_checkpoint_interval=0)
