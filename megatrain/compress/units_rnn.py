"""Pruning units of the LSTM/GRU models (megatrain/models/rnn.py): the hidden units of every layer/direction.

torch stacks the gates of a layer along the rows of weight_ih/weight_hh/bias_ih/bias_hh (LSTM [i, f, g, o],
GRU [r, z, n]; G = 4 or 3), so hidden unit j of a layer with H units owns
  rows j, H+j, …, (G−1)H+j of weight_ih, weight_hh, bias_ih, bias_hh (its own gates),
  column j of weight_hh (what it feeds back to every unit),
  column d·H+j of the next layer's weight_ih, both directions (d = its direction: 0 forward, 1 backward),
  column d·H+j of the head (lm_head of the LM; fc of the classifier, which reads [h_fwd, h_bwd]).
Every layer and direction keeps the same count (nn.LSTM has one hidden_size); which units is chosen per layer
and direction. The embedding (layer 0's input) keeps model.hidden_size.
"""
from __future__ import annotations

from torch import nn

from megatrain.compress.channels import Group, Slice


def rnn_groups(model: nn.Module) -> list[Group]:
    """One group per (layer, direction) of ``model.rnn``; the head is ``lm_head`` or ``fc``."""
    rnn = model.rnn
    gates = 4 if isinstance(rnn, nn.LSTM) else 3
    h, dirs = rnn.hidden_size, 2 if rnn.bidirectional else 1
    head = "lm_head.weight" if hasattr(model, "lm_head") else "fc.weight"
    groups = []
    for layer in range(rnn.num_layers):
        for d in range(dirs):
            sfx = f"l{layer}" + ("_reverse" if d else "")
            own = [Slice(f"rnn.{t}_{sfx}", 0, gates) for t in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                   if rnn.bias or t.startswith("weight")]
            own.append(Slice(f"rnn.weight_hh_{sfx}", 1))
            if layer + 1 < rnn.num_layers:
                out = [Slice(f"rnn.weight_ih_l{layer + 1}{'_reverse' if d2 else ''}", 1, 1, d * h)
                       for d2 in range(dirs)]
            else:
                out = [Slice(head, 1, 1, d * h)]
            groups.append(Group(f"rnn.{sfx}", h, (*own, *out)))
    return groups
