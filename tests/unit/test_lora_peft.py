"""LoRA interop: the PEFT adapter directory loads with ``peft.PeftModel.from_pretrained`` on the HF base and gives
megatrain's LoRA logits (llama, and gpt2 through its fused c_attn); the merged HF export gives them too."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from megatrain.config.schema import LoraConfig  # noqa: E402
from megatrain.errors import CheckpointError  # noqa: E402
from megatrain.interop import hf  # noqa: E402
from megatrain.interop.peft import save_peft_adapter  # noqa: E402
from megatrain.models.build import build_model  # noqa: E402
from megatrain.parallelize import parallelize  # noqa: E402
from tests.unit.test_hf_families import tiny  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gpt2_base():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def lora_model(hf_dir, targets, rank=3, alpha=12.0):
    """megatrain's LoRA model on the HF weights, with random (nonzero) B so the adapters matter."""
    from megatrain.config import build_config
    model_cfg = hf.model_config_from_hf(str(hf_dir)).model_copy(
        update={"lora": LoraConfig(rank=rank, alpha=alpha, targets=targets)})
    cfg = build_config({"model": model_cfg.model_dump(), "train": {"seed": 5}})
    model = parallelize(build_model(cfg.model, meta=True), cfg, None, source=hf.HFSource(str(hf_dir), cfg.model))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return model.eval(), cfg


@pytest.mark.parametrize("arch, targets", [("llama", ALL), ("llama", ["q_proj", "v_proj"]),
                                           ("gpt2", ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
                                           ("gpt2", ["v_proj", "down_proj"])])
def test_peft_loads_the_adapter_with_equal_logits(tmp_path, arch, targets):
    base = tiny("llama") if arch == "llama" else gpt2_base()
    base.save_pretrained(tmp_path / "hf")
    model, cfg = lora_model(tmp_path / "hf", [t for t in targets if arch == "llama" or t != "gate_proj"])
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out = save_peft_adapter(state, cfg.model, str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["lora_alpha"] == 12.0
    ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        want = model(ids)
        plain = base(ids).logits
        peft_model = peft.PeftModel.from_pretrained(base, out).eval()
        got = peft_model(ids).logits
    assert (want - plain).abs().max() > 1e-2  # the adapters change the logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    adapted = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A.default"))
    hf_modules = {"qkv" if arch == "gpt2" and t in ("q_proj", "k_proj", "v_proj") else t for t in targets}
    assert adapted == 2 * len(hf_modules)  # 2 layers; gpt2's q, k, v share one c_attn adapter


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_export_gives_the_lora_logits(tmp_path, arch):
    base = tiny("llama") if arch == "llama" else gpt2_base()
    base.save_pretrained(tmp_path / "hf")
    targets = ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"] + (["gate_proj"] if arch == "llama" else [])
    model, cfg = lora_model(tmp_path / "hf", targets)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out = hf.save_state_pretrained(state, cfg.model, str(tmp_path / "merged"), dtype="float32")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids), rtol=1e-4, atol=1e-4)
    assert not any("lora" in k for k in merged.state_dict())


def test_export_without_adapters_is_refused(tmp_path):
    base = tiny("llama")
    base.save_pretrained(tmp_path / "hf")
    model = hf.from_pretrained(str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="no LoRA adapters"):
        save_peft_adapter(model.state_dict(), model.cfg, str(tmp_path / "a"))


def test_existing_adapter_dir_needs_overwrite(tmp_path):
    base = tiny("llama")
    base.save_pretrained(tmp_path / "hf")
    model, cfg = lora_model(tmp_path / "hf", ["q_proj"])
    state = {k: v.detach() for k, v in model.state_dict().items()}
    save_peft_adapter(state, cfg.model, str(tmp_path / "a"))
    with pytest.raises(CheckpointError, match="checkpoint.export_peft=.*export_overwrite"):
        save_peft_adapter(state, cfg.model, str(tmp_path / "a"))
    save_peft_adapter(state, cfg.model, str(tmp_path / "a"), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "hf"]  # no temp or old directory left
