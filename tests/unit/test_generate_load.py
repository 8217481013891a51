"""megatrain.infer.load on the kinds no training run is needed for: an older DeepSpeed step dir of a tied GPT-2
(built on the device, tie kept, logits equal to the plain model), a saved model whose tokenizer is found through
the model it was pruned from, and the one-line refusals (no tokenizer, not a model, extra tensors)."""
import json

import pytest
import torch

from megatrain.config import build_config
from megatrain.errors import UserError
from megatrain.infer.load import load_for_inference
from megatrain.weights.sources import build_plain, save_model

MODEL = dict(arch="gpt2", vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, max_seq_len=32)


def _plain():
    return build_plain(build_config({"model": MODEL}).model, seed=4).eval()


def test_legacy_deepspeed_step_of_a_tied_model(tmp_path):
    model = _plain()
    step = tmp_path / "step"
    step.mkdir()
    # data.path names no directory: the default (data_cache/stdlib) may exist in the checkout the suite runs from
    config = build_config({"model": MODEL, "data": {"path": str(tmp_path / "no_data")}})
    (step / "megatrain.json").write_text(json.dumps({"config": config.model_dump(mode="json")}))
    torch.save({"module": model.state_dict()}, step / "mp_rank_00_model_states.pt")
    loaded = load_for_inference(str(step), device="cpu", need_tokenizer=False)
    assert loaded.kind == "checkpoint" and loaded.tokenizer is None and not loaded.model.training
    assert loaded.model.head.lm_head.weight is loaded.model.embed.wte.weight
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), model(ids), rtol=0, atol=0)
    with pytest.raises(UserError, match="--tokenizer") as err:
        load_for_inference(str(step), device="cpu")
    assert "\n" not in str(err.value)


def test_saved_model_takes_the_tokenizer_of_its_source(tmp_path):
    from tests.unit.test_generate import save_tokenizer
    source = tmp_path / "hf"
    source.mkdir()
    save_tokenizer(source)
    (source / "config.json").write_text("{}")  # an HF dir as far as kind detection goes; only its tokenizer is read
    model = _plain()
    saved = save_model(str(tmp_path / "pruned"), model, build_config({"model": MODEL}).model,
                       extra={"pruned_from": str(source)})
    loaded = load_for_inference(saved, device="cpu")
    assert loaded.kind == "saved" and loaded.tokenizer.path == str(source)
    assert loaded.model.head.lm_head.weight is loaded.model.embed.wte.weight
    other = load_for_inference(saved, device="cpu", tokenizer=str(source))
    assert other.tokenizer.eos_id == loaded.tokenizer.eos_id


def test_not_a_model_and_foreign_tensors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="not a model"):
        load_for_inference(str(tmp_path), device="cpu")
    model = _plain()
    saved = save_model(str(tmp_path / "m"), model, build_config({"model": MODEL}).model)
    from safetensors.torch import load_file, save_file
    state = load_file(f"{saved}/model.safetensors")
    state["layers.9.attn.q_proj.weight"] = torch.zeros(2, 2)
    save_file(state, f"{saved}/model.safetensors")
    with pytest.raises(UserError, match="layers.9.attn.q_proj.weight") as err:
        load_for_inference(saved, device="cpu", need_tokenizer=False)
    assert "\n" not in str(err.value)


def test_rnn_language_model_loads_for_evaluation(tmp_path):
    """RNN LMs are built for real (not on meta) and loaded strictly, a tied head included."""
    cfg = build_config({"model": dict(arch="lstm", task="language_modeling", vocab_size=50, hidden_size=16,
                                      num_layers=1, max_seq_len=16, tie_embeddings=True)}).model
    model = build_plain(cfg, seed=2).eval()
    saved = save_model(str(tmp_path / "lstm"), model, cfg)
    loaded = load_for_inference(saved, device="cpu", need_tokenizer=False)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), model(ids), rtol=0, atol=0)
