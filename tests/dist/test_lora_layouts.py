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

