"""Parameters each rank holds under (tp, pp), from the config alone: no process group, no GPU, no weights.

The unsharded model is built on the meta device (free at any size). Each parameter's tensor-parallel share follows
the rules of ``parallelize.tensor_parallel`` (q/k/v, gate/up column-parallel, o/down row-parallel with a replicated
bias, vocabulary padded to a multiple of tp, norms and positions replicated). Pipeline stages are cut by
DeepSpeed's own partition functions over the same layer list ``parallelize.pipeline`` hands to PipelineModule,
with the same per-layer weights, so the stages are the ones training will get. Tested equal, parameter for
parameter count, to the engines the Trainer builds (tests/dist/test_plan_params.py). With model.lora or
train.freeze each count also says how much of it trains: only that part has gradients and optimizer state.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from megatrain.config.schema import ModelConfig
from megatrain.parallelize.tensor_parallel import kv_weight_heads, padded_vocab_size

_ADAPTER = re.compile(r"layers\.\d+\.(attn|mlp)\.(\w+)_proj\.lora_(A|B)$")
_SPLIT = re.compile(r"layers\.\d+\.(attn\.(q|k|v)_proj\.(weight|bias)|attn\.o_proj\.weight|"
                    r"mlp\.(gate|up)_proj\.(weight|bias)|mlp\.down_proj\.weight)$")


@dataclass
class StageParams:
    stage: int
    layers: list[str]  # pipeline layer names on this stage
    numel: int  # parameters this rank holds (its tp share; a tied token table counts on both end stages)
    blocks: int  # Transformer blocks on this stage
    trainable: int  # of numel, those that train (LoRA adapters, or all but train.freeze): optimizer state, grads


def meta_model(m: ModelConfig, freeze: tuple[str, ...] = ()):
    """The model of ``m``'s family (model registry), on the meta device, with its LoRA adapters (model.lora) and
    ``freeze`` (train.freeze) applied by the same transform training uses."""
    from megatrain.models.build import build_model
    with torch.device("meta"):
        model = build_model(m, seed=0)
    if m.lora.enabled or freeze:
        from megatrain.parallelize.lora import apply_freeze, apply_lora
        from megatrain.parallelize.param_spec import tag_logical_names
        tag_logical_names(model)
        if m.lora.enabled:
            apply_lora(model, m.lora, seed=0)
        apply_freeze(model, list(freeze))
    return model


def _tp_share(name: str, numel: int, shape, m: ModelConfig, tp: int) -> int:
    adapter = _ADAPTER.match(name)
    if adapter:  # sharded like its base (parallelize/lora.py): column base → B split, row base → A split
        proj, ab = adapter.group(2), adapter.group(3)
        if proj in ("o", "down"):
            return numel // tp if ab == "A" else numel
        if ab == "A":
            return numel
        return numel // (min(tp, m.kv_heads) if proj in ("k", "v") else tp)
    if name in ("embed.wte.weight", "head.lm_head.weight"):
        return padded_vocab_size(m.vocab_size, tp) // tp * shape[1]
    if _SPLIT.match(name):
        if re.search(r"attn\.(k|v)_proj\.", name):  # split, one replicated head per rank, or whole
            return numel * kv_weight_heads(m.kv_heads, tp) // m.kv_heads
        return numel // tp
    return numel  # norms, positions, row-parallel biases: replicated on every tp rank


def layer_param_counts(m: ModelConfig, tp: int, freeze: tuple[str, ...] = ()) -> list[tuple[str, int]]:
    """(name, tp-local parameters) of each pipeline layer, in PipelineModule order:
    [token table] [positions + dropout] [block 0 .. L-1] [final norm] [LM head (the token table again if tied)]."""
    return [(name, total) for name, total, _ in _layer_counts(m, tp, freeze)]


def _layer_counts(m: ModelConfig, tp: int, freeze: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """(name, tp-local parameters, of which trainable) of each pipeline layer."""
    model = meta_model(m, freeze)
    share = {n: (_tp_share(n, p.numel(), p.shape, m, tp), p.requires_grad) for n, p in model.named_parameters()}

    def count(prefix: str) -> tuple[int, int]:
        kept = [(v, trains) for n, (v, trains) in share.items() if n.startswith(prefix)]
        return sum(v for v, _ in kept), sum(v for v, trains in kept if trains)
    table = count("embed.wte.")
    layers = [("tokens", *table), ("positions", *count("embed.wpe."))]
    layers += [(f"block {i}", *count(f"layers.{i}.")) for i in range(m.num_layers)]
    layers += [("final norm", *count("head.norm.")),
               ("lm head", *(table if m.tied else count("head.lm_head.")))]
    return layers


def stage_params(m: ModelConfig, *, tp: int, pp: int, partition: str = "parameters",
                 freeze: tuple[str, ...] | list[str] = ()) -> list[StageParams]:
    """Per pipeline stage: which layers and how many parameters one of its tp ranks holds (and trains)."""
    return _stage_params(m.model_dump_json(), tp, pp, partition, tuple(freeze))


@functools.lru_cache(maxsize=256)  # the layout search asks for the same (model, tp, pp) many times
def _stage_params(model_json: str, tp: int, pp: int, partition: str, freeze: tuple[str, ...]) -> list[StageParams]:
    m = ModelConfig.model_validate_json(model_json)
    layers = _layer_counts(m, tp, freeze)
    if pp == 1:
        tied = layers[0][1:] if m.tied else (0, 0)
        return [StageParams(0, [n for n, _, _ in layers], sum(c for _, c, _ in layers) - tied[0], m.num_layers,
                            sum(t for _, _, t in layers) - tied[1])]
    from deepspeed.runtime import utils as ds_utils
    weights = [t for _, _, t in layers]  # DeepSpeed balances stages by trainable parameters (requires_grad)
    parts = (ds_utils.partition_balanced(weights=weights, num_parts=pp) if partition == "parameters"
             else ds_utils.partition_uniform(num_items=len(layers), num_parts=pp))
    out = []
    for s in range(pp):
        kept = layers[parts[s]:parts[s + 1]]
        names = [n for n, _, _ in kept]
        numel, trainable = sum(c for _, c, _ in kept), sum(t for _, _, t in kept)
        if m.tied and "tokens" in names and "lm head" in names:
            numel, trainable = numel - layers[0][1], trainable - layers[0][2]  # both ends on one stage: one table
        out.append(StageParams(s, names, numel, sum(n.startswith("block ") for n in names), trainable))
    return out
