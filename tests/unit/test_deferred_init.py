"""Models are built without torch's default random fill (every parameter is set afterwards), and a meta build
does not import torch._dynamo (torch decomposes normal_ on meta through torch._refs, whose wrapper imports it)."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from megatrain.config.schema import ModelConfig
from megatrain.models.deferred_init import skip_random_init
from megatrain.models.transformer import Transformer, build_transformer, init_weights
from megatrain.testing import ROOT
from tests.conftest import TINY_MODELS


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_built_model_is_exactly_the_name_seeded_init(arch):
    cfg = ModelConfig(**TINY_MODELS[arch], vocab_size=96)
    ref = Transformer(cfg)  # torch's default fill first, then the name-seeded init over it
    init_weights(ref, seed=5, std=cfg.init_std, num_layers=cfg.num_layers)
    got = build_transformer(cfg, seed=5)
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for name in ref_sd:
        torch.testing.assert_close(got_sd[name], ref_sd[name], rtol=0, atol=0, msg=name)


def test_random_fills_are_skipped_and_deterministic_ones_run():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with skip_random_init():
        lin = nn.Linear(4, 3)
        emb = nn.Embedding(5, 2)
        norm = nn.LayerNorm(3)
        t = torch.full((3,), 7.0)
        t.uniform_()
        nn.init.normal_(t)
        nn.init.kaiming_uniform_(lin.weight)
        nn.init.trunc_normal_(t)  # ends in Tensor.uniform_ / erfinv_ inside the mode: uniform_ is skipped
    assert torch.equal(torch.get_rng_state(), before)  # nothing drew a random number
    assert torch.equal(norm.weight, torch.ones(3)) and torch.equal(norm.bias, torch.zeros(3))
    assert lin.weight.shape == (3, 4) and emb.weight.shape == (5, 2)
    u = torch.empty(1000).uniform_()  # outside the mode fills run again
    assert 0.4 < u.mean().item() < 0.6


def test_a_meta_build_imports_no_dynamo():
    code = ("import sys; from megatrain.config.schema import ModelConfig; "
            "from megatrain.models.transformer import build_transformer; "
            "m = build_transformer(ModelConfig(arch='gpt2', hidden_size=64, num_layers=2, num_heads=4, "
            "max_seq_len=32, vocab_size=96), meta=True); "
            "print(m.embed.wte.weight.device, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ROOT}).stdout.split()
    assert out == ["meta", "False"]
