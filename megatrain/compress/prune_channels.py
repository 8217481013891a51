"""Structured pruning of ResNets (inner conv channels) and LSTM/GRU models (hidden units).

Sizes are uniform per config field, so the result is an ordinary megatrain config: a ResNet keeps the same
inner width in every block of a stage (``model.inner_widths``, one per stage), an RNN the same width in every
layer and direction (``model.rnn_hidden_size``). Which channels / units go is chosen per block / per layer and
direction by importance (units_cnn.py, units_rnn.py list the tensors each unit owns). The surgery drops the
removed indices from the state dict and loads it strictly into a model built from the smaller config.

These models are not tensor-parallel in megatrain, so tp must be 1; data-parallel ranks sum data-dependent
scores and therefore remove the same units.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megatrain.compress.channels import Group, remove_units, removed_by_score, unit_mass
from megatrain.compress.importance import taylor_mass
from megatrain.compress.prune import _removed
from megatrain.compress.units_cnn import resnet_groups
from megatrain.compress.units_rnn import rnn_groups
from megatrain.config.schema import ModelConfig, PruneConfig
from megatrain.errors import UserError
from megatrain.distributed import host_collectives as hc


@dataclass
class ChannelScores:
    units: dict[str, torch.Tensor]  # group key -> (size,) float64
    kind: str

    def final(self, x: torch.Tensor) -> torch.Tensor:
        """Reported score of a raw unit mass: sqrt for l2, as is otherwise."""
        return x.sqrt() if self.kind == "l2" else x


def channel_sizes(m: ModelConfig) -> tuple[int, ...]:
    """Prunable widths: inner width per ResNet stage, or (recurrent width,) of an RNN."""
    return tuple(m.stage_inner_widths) if m.arch == "resnet" else (m.rnn_width,)


def groups_of(model: nn.Module, m: ModelConfig) -> list[Group]:
    return resnet_groups(model) if m.arch == "resnet" else rnn_groups(model)


def check_channel_target(m: ModelConfig, p: PruneConfig, *, tp: int = 1) -> None:
    """One-line errors for settings channel pruning cannot honour (before any process group exists)."""
    if tp > 1:
        raise UserError(f"model.arch={m.arch} is not tensor-parallel in megatrain; prune it with parallel.tp=1 "
                         "(data parallelism works)")
    for field in ("mlp", "heads", "layers"):
        if getattr(p, field):
            raise UserError(f"prune.{field} is for gpt2/llama Transformers; for model.arch={m.arch} use "
                             f"prune.channels (and set prune.{field}=0)")
    if p.channels == 0:
        raise UserError(f"prune.channels=0 removes nothing from model.arch={m.arch}; set a fraction in (0, 1), "
                         "e.g. prune.channels=0.5")
    if m.arch != "resnet" and m.task == "language_modeling" and m.tied:
        raise UserError("model.tie_embeddings=true: the LM head shares the embedding, so its input cannot lose "
                         "hidden units; prune a model trained with model.tie_embeddings=false")


def target_channel_sizes(m: ModelConfig, p: PruneConfig, *, tp: int = 1) -> tuple[int, ...]:
    """The widths prune.channels asks for: the same fraction removed from every stage / layer."""
    check_channel_target(m, p, tp=tp)
    what = "inner channel of a ResNet stage" if m.arch == "resnet" else "RNN hidden unit"
    return tuple(w - _removed(p.channels, w, "channels", what) for w in channel_sizes(m))


def step_channel_sizes(start: tuple[int, ...], target: tuple[int, ...], i: int, n: int) -> tuple[int, ...]:
    """Widths after step i of n: kept counts move linearly from start to target."""
    if i >= n:
        return target
    return tuple(max(b, min(a, round(a - (a - b) * i / n))) for a, b in zip(start, target))


def _sum_over(x: dict[str, torch.Tensor], group) -> dict[str, torch.Tensor]:
    if group is None or dist.get_world_size(group) == 1:
        return x
    keys = sorted(x)
    flat = torch.cat([x[k] for k in keys])
    hc.all_reduce(flat, group=group)
    return dict(zip(keys, flat.split([x[k].numel() for k in keys])))


@torch.no_grad()
def _activation_mass(model: nn.Module, groups: list[Group], batches, loss_fn) -> dict[str, torch.Tensor]:
    """Mean |input| of each channel of the conv that reads a group (conv2 / conv3): a channel that is
    near zero after BN + ReLU feeds the next conv almost nothing."""
    sums: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    mods = dict(model.named_modules())

    def hook(key):
        def fn(_mod, args):
            x = args[0].detach().double()  # (B, C, H, W)
            sums[key] = sums.get(key, 0) + x.abs().sum((0, 2, 3)).cpu()
            count[key] = count.get(key, 0) + x.numel() // x.shape[1]
        return fn

    hooks = [mods[g.slices[-1].name.rsplit(".", 1)[0]].register_forward_pre_hook(hook(g.key)) for g in groups]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            loss_fn(model, batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {k: sums[k] / max(count[k], 1) for k in sums}


def _single_layer(rnn: nn.RNNBase, layer: int) -> nn.RNNBase:
    """Layer ``layer`` of a multi-layer nn.LSTM/GRU as a one-layer module sharing its weights (no copy)."""
    dirs = 2 if rnn.bidirectional else 1
    in_size = rnn.input_size if layer == 0 else rnn.hidden_size * dirs
    one = type(rnn)(in_size, rnn.hidden_size, num_layers=1, bias=rnn.bias, batch_first=rnn.batch_first,
                    bidirectional=rnn.bidirectional, device="meta")
    for name in list(one._parameters):  # weight_ih_l0[_reverse] <- weight_ih_l{layer}[_reverse]
        one._parameters[name] = getattr(rnn, name.replace("_l0", f"_l{layer}"))
    one._flat_weights = [one._parameters[n] for n in one._flat_weights_names]
    return one


@torch.no_grad()
def _rnn_activation_mass(model: nn.Module, batches, loss_fn) -> dict[str, torch.Tensor]:
    """Mean |h_t| of every hidden unit of every layer and direction over the real (unpadded) positions: h_t is
    all a unit passes on (to the next layer and the head), so a unit whose output stays near zero matters little.
    nn.LSTM/GRU do not expose inner layers' outputs, so the layers are rerun one at a time on the input the
    model's rnn received (packed sequences stay packed: only real tokens count)."""
    rnn = model.rnn
    h, dirs = rnn.hidden_size, 2 if rnn.bidirectional else 1
    sums: dict[str, torch.Tensor] = {}
    count = [0]

    def pre_hook(_mod, args):
        x = args[0]
        for layer in range(rnn.num_layers):
            x, _ = _single_layer(rnn, layer)(x)
            out = x.data if isinstance(x, nn.utils.rnn.PackedSequence) else x.reshape(-1, x.shape[-1])  # (N, D·H)
            for d in range(dirs):
                key = f"rnn.l{layer}" + ("_reverse" if d else "")
                sums[key] = sums.get(key, 0) + out[:, d * h:(d + 1) * h].double().abs().sum(0).cpu()
        count[0] += out.shape[0]

    hook = rnn.register_forward_pre_hook(pre_hook)
    was_training = model.training
    model.eval()  # no dropout between layers: the model's own eval-mode function
    try:
        for batch in batches:
            loss_fn(model, batch)
    finally:
        hook.remove()
        model.train(was_training)
    return {k: v / max(count[0], 1) for k, v in sums.items()}


def channel_scores(kind: str, model: nn.Module, m: ModelConfig, batches: list[dict], loss_fn=None, *,
                   dp_group=None) -> ChannelScores:
    """Importance of every unit of every group (magnitude, taylor or activation; see importance.py)."""
    groups = groups_of(model, m)
    named = dict(model.named_parameters())
    if kind in ("l1", "l2"):
        mass = {n: (p.detach().double().abs() if kind == "l1" else p.detach().double().square())
                for n, p in named.items()}
        return ChannelScores(unit_mass(groups, mass), kind)
    if kind == "taylor":
        acc = taylor_mass(model, batches, loss_fn)
        mass = {n: acc[id(p)] for n, p in named.items() if id(p) in acc}
        return ChannelScores(_sum_over(unit_mass(groups, mass), dp_group), kind)
    if kind == "activation":
        mass = _activation_mass(model, groups, batches, loss_fn) if m.arch == "resnet" else \
            _rnn_activation_mass(model, batches, loss_fn)
        return ChannelScores(_sum_over(mass, dp_group), kind)
    raise UserError(f"prune.importance={kind!r} is unknown; use l1, l2, taylor or activation")


def pruned_channel_config(m: ModelConfig, new: tuple[int, ...]) -> ModelConfig:
    if m.arch == "resnet":
        return m.model_copy(update={"inner_widths": list(new)})
    return m.model_copy(update={"rnn_hidden_size": new[0]})


def prune_channels(model: nn.Module, m: ModelConfig, scores: ChannelScores,
                   new: tuple[int, ...]) -> tuple[nn.Module, ModelConfig]:
    """A pruned copy of ``model`` (plain) at widths ``new`` and its config; the most important units stay."""
    from megatrain.weights.sources import build_plain
    groups = groups_of(model, m)
    removed = removed_by_score(groups, scores.units, lambda g: new[g.stage])
    state = remove_units({k: v.detach() for k, v in model.state_dict().items()}, groups, removed)
    new_cfg = ModelConfig(**pruned_channel_config(m, new).model_dump())  # validated
    pruned = build_plain(new_cfg, state, seed=0)
    pruned.to(next(model.parameters()).device)
    return pruned, new_cfg
