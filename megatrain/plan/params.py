"""Parameters each rank holds under (tp, pp), from the config alone: no process group, no GPU, no weights.

The unsharded model is built on the meta device (free at any size). Each parameter's tensor-parallel share follows
the rules of ``parallelize.tensor_parallel`` (q/k/v, gate/up column-parallel, o/down row-parallel with a replicated
bias, vocabulary padded to a multiple of tp, norms and positions replicated). Pipeline stages are cut by
DeepSpeed's own partition functions over the same layer list ``parallelize.pipeline`` hands to PipelineModule,
with the same per-layer weights, so the stages are the ones training will get. Tested equal, parameter for
parameter count, to the engines the Trainer builds (tests/dist/test_plan_params.py).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from megatrain.config.schema import ModelConfig
from megatrain.parallelize.tensor_parallel import kv_weight_heads, padded_vocab_size

_SPLIT = re.compile(r"layers\.\d+\.(attn\.(q|k|v)_proj\.(weight|bias)|attn\.o_proj\.weight|"
                    r"mlp\.(gate|up)_proj\.(weight|bias)|mlp\.down_proj\.weight)$")


@dataclass
class StageParams:
    stage: int
    layers: list[str]  # pipeline layer names on this stage
    numel: int  # parameters this rank holds (its tp share; a tied token table counts on both end stages)
    blocks: int  # Transformer blocks on this stage


def meta_model(m: ModelConfig):
    """The model of ``m``'s family (model registry), on the meta device."""
    from megatrain.models.build import build_model
    with torch.device("meta"):
        return build_model(m, seed=0)


def _tp_share(name: str, numel: int, shape, m: ModelConfig, tp: int) -> int:
    if name in ("embed.wte.weight", "head.lm_head.weight"):
        return padded_vocab_size(m.vocab_size, tp) // tp * shape[1]
    if _SPLIT.match(name):
        if re.search(r"attn\.(k|v)_proj\.", name):  # split, one replicated head per rank, or whole
            return numel * kv_weight_heads(m.kv_heads, tp) // m.kv_heads
        return numel // tp
    return numel  # norms, positions, row-parallel biases: replicated on every tp rank


def layer_param_counts(m: ModelConfig, tp: int) -> list[tuple[str, int]]:
    """(name, tp-local parameters) of each pipeline layer, in PipelineModule order:
    [token table] [positions + dropout] [block 0 .. L-1] [final norm] [LM head (the token table again if tied)]."""
    model = meta_model(m)
    share = {n: _tp_share(n, p.numel(), p.shape, m, tp) for n, p in model.named_parameters()}

    def count(prefix: str) -> int:
        return sum(v for n, v in share.items() if n.startswith(prefix))
    table = count("embed.wte.")
    layers = [("tokens", table), ("positions", count("embed.wpe."))]
    layers += [(f"block {i}", count(f"layers.{i}.")) for i in range(m.num_layers)]
    layers += [("final norm", count("head.norm.")),
               ("lm head", table if m.tied else count("head.lm_head."))]
    return layers


def stage_params(m: ModelConfig, *, tp: int, pp: int, partition: str = "parameters") -> list[StageParams]:
    """Per pipeline stage: which layers and how many parameters one of its tp ranks holds."""
    return _stage_params(m.model_dump_json(), tp, pp, partition)


@functools.lru_cache(maxsize=256)  # the layout search asks for the same (model, tp, pp) many times
def _stage_params(model_json: str, tp: int, pp: int, partition: str) -> list[StageParams]:
    m = ModelConfig.model_validate_json(model_json)
    layers = layer_param_counts(m, tp)
    if pp == 1:
        return [StageParams(0, [n for n, _ in layers], sum(c for _, c in layers) - (layers[0][1] if m.tied else 0),
                            m.num_layers)]
    from deepspeed.runtime import utils as ds_utils
    weights = [c for _, c in layers]
    parts = (ds_utils.partition_balanced(weights=weights, num_parts=pp) if partition == "parameters"
             else ds_utils.partition_uniform(num_items=len(layers), num_parts=pp))
    out = []
    for s in range(pp):
        names = [n for n, _ in layers[parts[s]:parts[s + 1]]]
        numel = sum(weights[parts[s]:parts[s + 1]])
        if m.tied and "tokens" in names and "lm head" in names:
            numel -= layers[0][1]  # both ends on one stage: one table
        out.append(StageParams(s, names, numel, sum(n.startswith("block ") for n in names)))
    return out
