"""Every registry family imported from tiny random models written by transformers 5 (and from hand-written
4.x-style config.json files) gives transformers' logits to 1e-4 in fp32; RoPE scaling llama3/linear/yarn is
exact; an export reloads in transformers with identical tensors."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatrain.interop import hf  # noqa: E402

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": 8}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 24, "num_key_value_heads": 1}),
}


def tiny(family, **over):
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**(COMMON | extra | over)))
    with torch.no_grad():  # biases and norm weights away from their 0/1 init, so a dropped one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def max_diff(model, ref, seq=23):
    ids = torch.randint(0, ref.config.vocab_size, (2, seq))
    with torch.no_grad():
        return (model(ids) - ref(ids).logits).abs().max().item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_matches_transformers(tmp_path, family):
    ref = tiny(family)
    ref.save_pretrained(tmp_path / "hf")
    model = hf.from_pretrained(str(tmp_path / "hf"))
    assert model.cfg.family == family
    assert max_diff(model, ref) <= 1e-4  # mistral: 23 tokens > sliding_window=8, so the window is exercised


def test_sliding_window_is_honoured(tmp_path):
    ref = tiny("mistral")
    ref.save_pretrained(tmp_path / "hf")
    model = hf.from_pretrained(str(tmp_path / "hf"))
    assert model.cfg.sliding_window == 8
    model.cfg.sliding_window = None
    for layer in model.layers:
        layer.attn.window = None
    assert max_diff(model, ref) > 1e-3  # full attention differs: the match above is the window's


ROPES = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("kind", list(ROPES))
def test_rope_scaling_exact(tmp_path, kind):
    ref = tiny("llama", rope_parameters={"rope_theta": 500000.0, **ROPES[kind]})
    ref.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "rope_theta" not in saved and saved["rope_parameters"]["rope_theta"] == 500000.0  # transformers-5 form
    model = hf.from_pretrained(str(tmp_path / "hf"))
    assert model.cfg.rope_theta == 500000.0 and model.cfg.rope_scaling["rope_type"] == kind
    assert max_diff(model, ref, seq=40) <= 1e-4  # 40 positions > original 16: the scaled range is used


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hand_written_4x_config(tmp_path, family):
    """A 4.x-style config.json (top-level rope_theta / rope_scaling, torch_dtype): same model in both."""
    ref = tiny(family)
    ref.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("rope_parameters")
    cfg.pop("dtype", None)
    cfg |= {"rope_theta": 100000.0, "rope_scaling": {"type": "linear", "factor": 2.0}, "torch_dtype": "float32",
            "transformers_version": "4.45.0"}
    path.write_text(json.dumps(cfg))
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    model = hf.from_pretrained(str(tmp_path / "hf"))
    assert model.cfg.rope_theta == 100000.0 and model.cfg.rope_scaling["factor"] == 2.0
    assert max_diff(model, again) <= 1e-4


@pytest.mark.parametrize("family", list(FAMILIES) + ["gpt2"])
def test_export_reloads_identical(tmp_path, family):
    if family == "gpt2":
        torch.manual_seed(0)
        ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=99, n_embd=48, n_layer=2, n_head=4,
                                                                   n_positions=64, activation_function="relu")).eval()
    else:
        ref = tiny(family)
    ref.save_pretrained(tmp_path / "hf")
    model = hf.from_pretrained(str(tmp_path / "hf"))
    out = hf.save_pretrained(model, str(tmp_path / "export"))
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(again) is type(ref)
    new_state = again.state_dict()
    for name, t in ref.state_dict().items():
        if not name.endswith(("attn.bias", "masked_bias")):
            assert torch.equal(t, new_state[name]), name
    ids = torch.randint(0, ref.config.vocab_size, (1, 19))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref(ids).logits)
