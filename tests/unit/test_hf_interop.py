"""Hugging Face in/out: tiny random models written by transformers load into megatrain with equal logits;
megatrain's export (sharded above a size) reloads in transformers with identical tensors."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatrain.interop import hf  # noqa: E402


def _tiny(kind):
    torch.manual_seed(0)
    if kind == "llama":  # GQA and an odd vocabulary
        cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       rms_norm_eps=1e-6, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=99, n_embd=48, n_layer=2, n_head=4, n_positions=64)
        model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_from_pretrained_matches_transformers(tmp_path, kind):
    ref = _tiny(kind)
    ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # sharded index files too
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model = hf.from_pretrained(str(tmp_path / "hf"))
    ids = torch.randint(0, ref.config.vocab_size, (2, 23))
    with torch.no_grad():
        diff = (model(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_pretrained_reloads_in_transformers(tmp_path, kind):
    ref = _tiny(kind)
    ref.save_pretrained(tmp_path / "hf")
    model = hf.from_pretrained(str(tmp_path / "hf"))
    out = hf.save_pretrained(model, str(tmp_path / "export"), max_shard_bytes=30_000)
    index = json.loads(open(os.path.join(out, "model.safetensors.index.json")).read())
    assert len(set(index["weight_map"].values())) > 1
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ref_state, new_state = ref.state_dict(), again.state_dict()
    for name, t in ref_state.items():
        if name.endswith("attn.bias") or name.endswith("masked_bias"):
            continue
        assert torch.equal(t, new_state[name]), name
    ids = torch.randint(0, ref.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref(ids).logits)


def test_bad_directories(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        hf.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type='bert' is not supported"):
        hf.from_pretrained(str(tmp_path))
