"""Packed rows and cached decoding give the same logits as each document run alone (torch reference path)."""
import pytest
import torch

from megatrain.config.schema import ModelConfig
from megatrain.models.kv_cache import KVCache
from megatrain.models.transformer import build_transformer


def _model(arch: str, **kw):
    cfg = ModelConfig(arch=arch, vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=64,
                      **({"num_kv_heads": 2} if arch == "llama" else {}), **kw)
    return build_transformer(cfg, seed=3).eval()


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("gpt2", {}), ("llama", {"sliding_window": 3})])
def test_packed_row_equals_documents_alone(arch, kw):
    model = _model(arch, **kw)
    docs = [torch.randint(0, 97, (n,)) for n in (5, 9, 2)]
    ids = torch.cat(docs)[None]  # (1, 16)
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    segments = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = model(ids, positions=positions, segments=segments)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
        unmasked = model(ids)[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked[5:], alone[5:], atol=1e-3)  # without the masks documents leak into each other


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_decoding_equals_full_forward(arch):
    model = _model(arch)
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(len(model.layers), max_len=16)
        first = model(ids[:, :7], cache=cache)
        steps = [model(ids[:, i:i + 1], cache=cache) for i in range(7, 12)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 12


def test_left_padded_batch_decodes_like_unpadded_rows():
    model = _model("llama")
    a, b = torch.randint(4, 97, (6,)), torch.randint(4, 97, (3,))
    ids = torch.stack([a, torch.cat([torch.zeros(3, dtype=torch.long), b])])  # b left-padded to 6
    segments = torch.tensor([[1] * 6, [0] * 3 + [1] * 3])
    positions = (segments.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        cache = KVCache(len(model.layers), max_len=8)
        out = model(ids, positions=positions, segments=segments, cache=cache)
        nxt = torch.tensor([[5], [7]])
        step = model(nxt, positions=positions[:, -1:] + 1, segments=torch.ones(2, 1, dtype=torch.long), cache=cache)
        ref_b = model(torch.cat([b, torch.tensor([7])])[None])
    torch.testing.assert_close(out[1, 3:], ref_b[0, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, 0], ref_b[0, 3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], model(a[None])[0], atol=1e-5, rtol=1e-5)
