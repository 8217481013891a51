"""``launch/pretrain.py --model.from_hf=DIR`` (continued pretraining) takes the directory as finetune does, through
the one shared function (megatrain.interop.hf.resolve_from_hf): the same model config, the same one-line refusal
of a conflicting override, the tensors checked before any data work, the tokenizer defaulting to DIR's; and a real
run trains the directory's model (its export is the source's architecture, weights one Adam step away)."""
import importlib.util
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatrain.testing import run_ranks  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402
from tests.unit.test_hf_families import tiny  # noqa: E402


def _launcher(name):
    spec = importlib.util.spec_from_file_location(f"{name}_launcher", f"launch/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _configs_seen(monkeypatch, name, argv):
    """The Config each launcher would train (its run_training and data preparation stubbed out)."""
    import megatrain.data.prepare
    seen = []
    monkeypatch.setattr(megatrain.data.prepare, "prepare_corpus", lambda *a, **k: None)
    launcher = _launcher(name)
    monkeypatch.setattr(launcher, "run_training", lambda cfg, local_rank: seen.append(cfg))
    launcher.main(argv)
    return seen[0]


def test_pretrain_translates_config_json_as_finetune(tmp_path, monkeypatch):
    ref = tiny("qwen2", num_key_value_heads=1)
    ref.save_pretrained(tmp_path / "hf")
    argv = ["--config", "recipes/finetune_llama.yaml", f"--model.from_hf={tmp_path / 'hf'}",
            f"--log.dir={tmp_path / 'log'}", "--model.num_heads=4"]  # an agreeing override is fine
    pre, fine = (_configs_seen(monkeypatch, name, argv) for name in ("pretrain", "finetune"))
    assert pre.model == fine.model
    assert (pre.model.family, pre.model.hidden_size, pre.model.kv_heads, pre.model.qkv_bias, pre.model.tied) == \
        ("qwen2", 64, 1, True, True)
    assert pre.data.tokenizer == fine.data.tokenizer == str(tmp_path / "hf")


@pytest.mark.parametrize("name", ["pretrain", "finetune"])
def test_pretrain_and_finetune_refuse_the_same_way(tmp_path, monkeypatch, capsys, name):
    tiny("llama").save_pretrained(tmp_path / "hf")
    base = ["--config", "recipes/finetune_llama.yaml", f"--model.from_hf={tmp_path / 'hf'}", f"--log.dir={tmp_path}"]
    with pytest.raises(SystemExit) as err:
        _configs_seen(monkeypatch, name, base + ["--model.hidden_size=128"])
    assert err.value.code == 2
    assert "--model.hidden_size=128 conflicts with" in capsys.readouterr().err
    (tmp_path / "hf" / "model.safetensors").unlink()  # tensors are checked before any data work
    with pytest.raises(SystemExit) as err:
        _configs_seen(monkeypatch, name, base)
    assert err.value.code == 2
    assert "no model.safetensors" in capsys.readouterr().err


@pytest.mark.slow
def test_pretrain_from_hf_trains_that_model(tiny_corpus, tmp_path):
    vocab = json.loads(open(f"{tiny_corpus}/meta.json").read())["vocab_size"]
    ref = tiny("mistral", vocab_size=vocab, max_position_embeddings=64)
    ref.save_pretrained(tmp_path / "hf")
    # tiny_overrides' model fields are the recipe's; config.json replaces them, so only the weights' source is given
    argv = [a for a in tiny_overrides(tiny_corpus, tmp_path / "run", arch="llama", **{
        "train.max_steps": 1, "checkpoint.export_hf": str(tmp_path / "export")}) if not a.startswith("--model.")]
    run_ranks(1, ["launch/pretrain.py", *argv, f"--model.from_hf={tmp_path / 'hf'}"], timeout=300)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert type(again) is type(ref) and again.config.sliding_window == 8
    new = again.state_dict()
    for name, t in ref.state_dict().items():  # one Adam step moves each element by about lr (1e-3)
        assert new[name].shape == t.shape, name
        assert (new[name] - t).abs().max() <= 2e-3, name
