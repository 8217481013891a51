"""A complete, safe export: tokenizer files, generation_config.json, special ids, the source's dtype (or a
chosen one); a non-empty target is refused unless overwrite, and then only model files are replaced."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatrain.errors import CheckpointError  # noqa: E402
from megatrain.interop import hf  # noqa: E402
from tests.unit.test_hf_families import tiny  # noqa: E402
from tests.unit.test_hf_tokens import make_tokenizer  # noqa: E402


@pytest.fixture
def source(tmp_path):
    ref = tiny("llama", bos_token_id=0, eos_token_id=1, pad_token_id=None)
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    transformers.GenerationConfig(bos_token_id=0, eos_token_id=1, temperature=0.7, do_sample=True).save_pretrained(
        tmp_path / "hf")
    make_tokenizer(tmp_path / "tok", bos=True, eos=False)
    return tmp_path


def test_export_is_complete(source):
    model = hf.from_pretrained(str(source / "hf"))
    assert model.cfg.hf_dtype == "bfloat16" and model.cfg.hf_special == {"bos": 0, "eos": 1}
    out = hf.save_pretrained(model, str(source / "out"), tokenizer=str(source / "tok"))
    cfg = json.loads((source / "out" / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["dtype"]) == (0, 1, "bfloat16")
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.eos_token_id, gen.temperature) == (1, 0.7)  # ids kept, the source's sampling defaults kept
    again = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert next(again.parameters()).dtype == torch.bfloat16
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("x = 1")["input_ids"][0] == 0  # the tokenizer round-trips with its BOS rule
    f32 = hf.save_pretrained(model, str(source / "f32"), dtype="float32")
    assert next(transformers.AutoModelForCausalLM.from_pretrained(f32).parameters()).dtype == torch.float32


def test_non_empty_target_refused_then_overwrite_keeps_other_files(source):
    model = hf.from_pretrained(str(source / "hf"))
    target = source / "hf"  # pointing the export at the source directory itself
    (target / "README.md").write_text("model card")
    with pytest.raises(CheckpointError, match="non-empty directory.*export_overwrite=true"):
        hf.save_pretrained(model, str(target))
    with torch.no_grad():
        model.head.norm.weight.fill_(2.0)
    hf.save_pretrained(model, str(target), overwrite=True, max_shard_bytes=20_000)
    assert (target / "README.md").read_text() == "model card"
    assert (target / "model.safetensors.index.json").is_file() and not (target / "model.safetensors").exists()
    again = transformers.AutoModelForCausalLM.from_pretrained(target)
    assert torch.equal(again.model.norm.weight.float(), torch.full((64,), 2.0))
    assert not list(source.glob("*.tmp-export-*"))


def test_tokenizer_comes_from_the_prepared_data_dir(source):
    """What the trainer passes: data.path, whose meta.json names its own copy of the tokenizer."""
    from megatrain.config.schema import DataConfig
    from megatrain.data.prepare import prepare_corpus
    (source / "a.jsonl").write_text(json.dumps({"text": "def f(x):\n    return x\n"}))
    prepare_corpus(DataConfig(path=str(source / "data"), sources=[str(source / "a.jsonl")],
                              tokenizer=str(source / "tok"), val_fraction=0.0, min_chars=1, num_workers=1), seed=0)
    out = hf.save_pretrained(hf.from_pretrained(str(source / "hf")), str(source / "out"), tokenizer=str(source / "data"))
    assert (source / "out" / "tokenizer.json").is_file()
    assert transformers.AutoTokenizer.from_pretrained(out)("x")["input_ids"][0] == 0
