"""Strict import: fields that change the computation are used or refused in one line naming them; tensors the
config does not account for are refused; a CLI override that disagrees with config.json is refused."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatrain.config.schema import ModelConfig  # noqa: E402
from megatrain.errors import CheckpointError, ConfigError  # noqa: E402
from megatrain.interop import hf  # noqa: E402
from tests.unit.test_hf_families import max_diff, tiny  # noqa: E402


def _gpt2(tmp_path, **over):
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=99, n_embd=48, n_layer=2, n_head=4,
                                                               n_positions=64, **over)).eval()
    ref.save_pretrained(tmp_path / "hf")
    return ref


def _edit(path, **fields):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | fields))


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_new", "silu"])
def test_gpt2_activations_used(tmp_path, act):
    ref = _gpt2(tmp_path, activation_function=act)
    assert max_diff(hf.from_pretrained(str(tmp_path / "hf")), ref) <= 1e-4


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_llama_hidden_act_used(tmp_path, act):
    ref = tiny("llama", hidden_act=act)
    ref.save_pretrained(tmp_path / "hf")
    assert max_diff(hf.from_pretrained(str(tmp_path / "hf")), ref) <= 1e-4


@pytest.mark.parametrize("field,value,family", [
    ("activation_function", "quick_gelu", "gpt2"),
    ("scale_attn_by_inverse_layer_idx", True, "gpt2"),
    ("scale_attn_weights", False, "gpt2"),
    ("hidden_act", "tanh", "llama"),
    ("attention_bias", True, "llama"),
    ("mlp_bias", True, "llama"),
    ("use_sliding_window", True, "qwen2"),
    ("quantization_config", {"quant_method": "gptq"}, "llama"),
])
def test_unsupported_field_refused(tmp_path, field, value, family):
    if family == "gpt2":
        _gpt2(tmp_path)
    else:
        tiny(family).save_pretrained(tmp_path / "hf")
    _edit(tmp_path / "hf", **{field: value})
    with pytest.raises(CheckpointError, match=field) as err:
        hf.from_pretrained(str(tmp_path / "hf"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_unsupported_rope_refused_at_config(tmp_path, rope_type):
    tiny("llama").save_pretrained(tmp_path / "hf")
    _edit(tmp_path / "hf", rope_parameters={"rope_type": rope_type, "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(CheckpointError, match=f"rope_type={rope_type!r}"):
        hf.model_config_from_hf(str(tmp_path / "hf"))  # what finetune calls before preparing data
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        ModelConfig(arch="llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})


def test_bias_tensors_without_attention_bias_refused(tmp_path):
    """q/k/v biases in a llama-typed directory whose config has no attention_bias: refused, naming a tensor."""
    tiny("qwen2").save_pretrained(tmp_path / "hf")
    _edit(tmp_path / "hf", model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(CheckpointError, match=r"self_attn\.[qkv]_proj\.bias.*not used by a llama model"):
        hf.from_pretrained(str(tmp_path / "hf"))


def test_missing_tensor_refused(tmp_path):
    tiny("mistral").save_pretrained(tmp_path / "hf")
    _edit(tmp_path / "hf", model_type="qwen2", architectures=["Qwen2ForCausalLM"])  # qwen2 expects biases
    with pytest.raises(CheckpointError, match=r"_proj\.bias' not found in the checkpoint"):
        hf.from_pretrained(str(tmp_path / "hf"))


def test_cli_override_conflict_refused(tmp_path):
    ref = tiny("llama", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    ref.save_pretrained(tmp_path / "hf")
    path = str(tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"--model.rope_theta=10000.0 conflicts .* gives 500000.0"):
        hf.model_config_from_hf(path, explicit={"rope_theta": 10000.0})
    cfg = hf.model_config_from_hf(path, explicit={"rope_theta": 500000.0, "dropout": 0.1},
                                  base=ModelConfig(dropout=0.1))
    assert cfg.rope_theta == 500000.0 and cfg.dropout == 0.1  # an agreeing or non-architecture override is kept


def test_published_qwen25_style_fields_accepted(tmp_path):
    """Fields Qwen2.5's config.json carries (use_mrope=false, an unused sliding_window, max_window_layers) load;
    use_mrope=true is refused."""
    ref = tiny("qwen2")
    ref.save_pretrained(tmp_path / "hf")
    _edit(tmp_path / "hf", use_mrope=False, sliding_window=131072, max_window_layers=21, use_sliding_window=False,
          eos_token_id=[1, 2])
    model = hf.from_pretrained(str(tmp_path / "hf"))
    assert model.cfg.sliding_window is None and model.cfg.hf_special["eos"] == [1, 2]
    assert max_diff(model, ref) <= 1e-4
    _edit(tmp_path / "hf", use_mrope=True)
    with pytest.raises(CheckpointError, match="use_mrope=True"):
        hf.from_pretrained(str(tmp_path / "hf"))
