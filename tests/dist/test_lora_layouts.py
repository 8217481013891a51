"""LoRA on real ranks (gloo): tp=2 (with and without sequence parallelism) gives the one-process losses and
the same trained adapters; pp=2 and ZeRO-3 over dp=2 train to the same losses; a resumed LoRA run continues
the curve; the checkpoint holds optimizer state for the adapters only and the base is untouched.

The tiny Llama has one kv head, so tp=2 replicates it (the `_column_kv` path): B of k/v is replicated too and
its copies' gradients summed. Every projection is adapted. Tolerances as in test_layout_parity.py (2e-5 on the
loss, fp32 reduction order) and tests/conftest.assert_same_trained_weights on the weights.
"""
import json

import pytest
import torch

from megatrain.testing import run_ranks
from tests.conftest import assert_same_trained_weights, tiny_overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]

LORA = {"model.num_kv_heads": 1, "model.lora.rank": 4, "model.lora.alpha": 8.0,
        "model.lora.targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "train.max_steps": 6, "train.micro_batch_size": 2, "train.global_batch_size": 8, "train.lr": 1e-2,
        "checkpoint.save_final": True}


def _losses(log_dir) -> dict[int, float]:
    with open(log_dir / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _train(corpus, log_dir, world, **extra):
    args = tiny_overrides(corpus, log_dir, arch="llama", **(LORA | extra))
    run_ranks(world, ["launch/pretrain.py", *args], timeout=600)
    return _losses(log_dir)


def _weights(log_dir):
    from megatrain.checkpoint.layout_free import load_model_state
    return load_model_state(str(log_dir / "checkpoints"))[1]


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("lora_ref")
    return log_dir, _train(tiny_corpus, log_dir, 1)


def test_one_process_trains_only_the_adapters(reference):
    from megatrain.checkpoint.store import latest_step_dir, read_manifest
    from megatrain.models.transformer import init_tensor
    log_dir, losses = reference
    assert losses[6] < losses[1]
    state = _weights(log_dir)
    for name, t in state.items():
        if "lora" not in name and "norm" not in name:  # the base is still the seed-7 init
            torch.testing.assert_close(t, init_tensor(name, tuple(t.shape), seed=7, std=0.02, num_layers=2), msg=name)
    assert all(state[n].abs().max() > 0 for n in state if n.endswith("lora_B"))
    manifest = read_manifest(latest_step_dir(str(log_dir / "checkpoints")))
    optim = [k for f, e in manifest["files"].items() if f.startswith("optim") for k in e["tensors"]]
    assert optim and all(".lora_" in k for k in optim), optim[:4]  # moments for adapters only


def test_a_lora_checkpoint_loads_as_the_merged_plain_model(reference):
    from megatrain.config import build_config
    from megatrain.models.build import build_model
    from megatrain.parallelize import parallelize
    from megatrain.parallelize.materialize import StateSource
    from megatrain.weights import load_model
    log_dir, _ = reference
    plain, plain_cfg = load_model(str(log_dir / "checkpoints"))  # evaluate, generate, model.init_from read this
    assert plain_cfg.lora.rank == 0 and not any("lora" in n for n, _ in plain.named_parameters())
    cfg = build_config({"model": plain_cfg.model_dump() | {"lora": {"rank": 4, "alpha": 8.0,
                                                                     "targets": LORA["model.lora.targets"]}}})
    lora = parallelize(build_model(cfg.model, meta=True), cfg, None, source=StateSource(_weights(log_dir), "ckpt"))
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ids), lora.eval()(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [{"parallel.tp": 2}, {"parallel.tp": 2, "parallel.sequence_parallel": True},
                                    {"parallel.pp": 2}, {"parallel.zero_stage": 3}],
                         ids=["tp2", "tp2sp", "pp2", "zero3dp2"])
def test_layout_matches_one_process(tiny_corpus, tmp_path, reference, layout):
    ref_dir, ref = reference
    got = _train(tiny_corpus, tmp_path, 2, **layout)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=2e-5), (layout, step)
    assert_same_trained_weights(_weights(tmp_path), _weights(ref_dir), lr=1e-2)


def test_resume_continues_the_curve(tiny_corpus, tmp_path, reference):
    _, ref = reference
    extra = {"parallel.zero_stage": 1, "checkpoint.every": 3}
    _train(tiny_corpus, tmp_path, 2, **extra, **{"train.max_steps": 3})
    got = _train(tiny_corpus, tmp_path, 2, **extra, **{"checkpoint.resume": "auto"})
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(ref[step], rel=2e-5), step



def test_finetune_from_hf_exports_peft_adapter_and_merged_model(tiny_corpus, tmp_path):
    """One LoRA run from a Hugging Face llama: the PEFT adapter on that base and the merged export agree."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)).eval()
    base.save_pretrained(tmp_path / "hf")
    extra = {"model.from_hf": str(tmp_path / "hf"), "checkpoint.export_hf": str(tmp_path / "merged"),
             "checkpoint.export_peft": str(tmp_path / "adapter"), "parallel.tp": 2, "data.tokenizer": tiny_corpus}
    args = [a for a in tiny_overrides(tiny_corpus, tmp_path / "run", arch="llama", **(LORA | extra))
            if not a.startswith(("--model.hidden_size", "--model.num_layers", "--model.num_heads",
                                 "--model.num_kv_heads", "--model.ffn_hidden_size", "--model.norm_eps",
                                 "--model.max_seq_len", "--model.arch"))]  # the sizes come from config.json
    run_ranks(2, ["launch/finetune.py", *args], timeout=600)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        plain = base(ids).logits
        adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(ids).logits
        assert (adapted - plain).abs().max() > 1e-3  # training moved the adapters
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-4, atol=1e-4)


GPT2_PP = {"parallel.pp": 2, "model.num_layers": 3, "model.lora.rank": 4, "model.lora.alpha": 8.0,
           "train.max_steps": 6, "train.micro_batch_size": 2, "train.global_batch_size": 8, "train.lr": 1e-2,
           "checkpoint.save_final": True}


def test_gpt2_tied_pipeline_with_lora_and_freeze_trains(tiny_corpus, tmp_path):
    """gpt2: the frozen tied token table on both end stages (its gradient all-reduce is skipped), adapters on
    the stages' blocks, block 0 frozen altogether by train.freeze."""
    extra = GPT2_PP | {"train.freeze": ["layers.<1"]}
    run_ranks(2, ["launch/pretrain.py", *tiny_overrides(tiny_corpus, tmp_path, arch="gpt2", **extra)], timeout=600)
    losses = _losses(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and losses[6] < losses[1]
    state = _weights(tmp_path)
    assert not state["layers.0.attn.q_proj.lora_B"].any() and state["layers.1.attn.q_proj.lora_B"].abs().max() > 0


def test_a_fully_frozen_pipeline_stage_is_one_line(tiny_corpus, tmp_path):
    extra = GPT2_PP | {"model.num_layers": 2, "train.freeze": ["layers.<1"]}  # stage 0: tokens, block 0 only
    results = run_ranks(2, ["launch/pretrain.py", *tiny_overrides(tiny_corpus, tmp_path, arch="gpt2", **extra)],
                        timeout=300, check=False)
    for r in results:
        assert r.returncode == 2, r.stderr[-2000:]
        assert "error: a pipeline stage has no trainable parameter" in r.stderr
