"""Pruned models leave as Hugging Face models where the HF architecture can say their sizes: a head-, MLP- and
depth-pruned Llama (head_dim recorded) and an MLP/depth-pruned GPT-2 reload in transformers with the same logits;
a head-pruned GPT-2 (heads·head_dim != hidden, which HF GPT-2 cannot express) is refused in one line."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatrain.compress.importance import magnitude_scores  # noqa: E402
from megatrain.compress.prune import prune_model, target_sizes  # noqa: E402
from megatrain.config.schema import ModelConfig, PruneConfig  # noqa: E402
from megatrain.interop import hf  # noqa: E402
from megatrain.models.transformer import build_transformer  # noqa: E402

LLAMA = dict(arch="llama", vocab_size=53, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
             ffn_hidden_size=64, max_seq_len=16)
GPT2 = dict(arch="gpt2", vocab_size=53, hidden_size=32, num_layers=3, num_heads=4, max_seq_len=16)


def _pruned(fields, **targets):
    cfg = ModelConfig(**fields)
    model = build_transformer(cfg, seed=3)
    new = target_sizes(cfg, PruneConfig(**targets))
    return prune_model(model, cfg, magnitude_scores(model, kind="l2"), new)


@pytest.mark.parametrize("fields,targets", [
    (LLAMA, {"heads": 0.5, "mlp": 0.5, "layers": 0.34}),   # within-group head pruning: head_dim 8, 2 heads on 32
    (GPT2, {"mlp": 0.5, "layers": 0.34}),
], ids=["llama-heads-mlp-layers", "gpt2-mlp-layers"])
def test_pruned_model_exports_and_matches_in_transformers(tmp_path, fields, targets):
    pruned, pcfg = _pruned(fields, **targets)
    assert pcfg.num_layers == 2 and pcfg.ffn_size == ModelConfig(**fields).ffn_size // 2
    out = hf.save_pretrained(pruned.eval(), str(tmp_path / "hf"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 53, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, pruned(ids), rtol=1e-5, atol=1e-5)
    if fields["arch"] == "llama":
        assert theirs.config.head_dim == 8 and theirs.config.num_attention_heads == 2


def test_head_pruned_gpt2_export_is_refused_in_one_line(tmp_path):
    pruned, pcfg = _pruned(GPT2, heads=0.25)
    assert pcfg.num_heads == 3 and pcfg.head_dim == 8
    with pytest.raises(ValueError, match=r"model.head_dim=8: Hugging Face GPT-2 needs num_heads\*head_dim == "
                                         r"hidden_size") as err:
        hf.save_pretrained(pruned, str(tmp_path / "hf"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "hf").exists()
