"""Every optimizer the config offers resumes exactly under every ZeRO stage (18.4), and a checkpoint saved
before any optimizer step loads. Exactness is checked against the same layout's uninterrupted run: the resumed
steps give the same losses bit for bit."""
import json

import pytest

from megatrain.testing import run_ranks
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def losses(log_dir) -> dict[int, float]:
    with open(log_dir / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.parametrize("optimizer,stage", [("sgd", 0), ("sgd", 1), ("sgd", 2), ("sgd", 3), ("adamw", 0),
                                             ("adamw", 3)])
def test_resume_is_exact(tiny_corpus, tmp_path, optimizer, stage):
    extra = {"train.optimizer": optimizer, "parallel.zero_stage": stage, "train.max_steps": 4,
             "checkpoint.every": 2, "checkpoint.keep_last": 2, "train.lr": 0.05 if optimizer == "sgd" else 1e-3}
    full = tmp_path / "full"
    run_ranks(2, ["launch/pretrain.py", *tiny_overrides(tiny_corpus, full, **extra)], timeout=400)
    resumed = tmp_path / "resumed"
    run_ranks(2, ["launch/pretrain.py", *tiny_overrides(tiny_corpus, resumed, **extra),
                  f"--checkpoint.resume={full / 'checkpoints' / 'step_00000002'}"], timeout=400)
    ref, got = losses(full), losses(resumed)
    assert sorted(got) == [3, 4] and ref[4] != ref[3]
    assert got == {3: ref[3], 4: ref[4]}, (optimizer, stage)  # the momentum/moments came back exactly


def test_save_before_any_step_and_optimizer_switch_is_refused(tiny_corpus, tmp_path):
    from megatrain.config import load_config
    from megatrain.train.trainer import Trainer
    cfg = load_config(None, tiny_overrides(tiny_corpus, tmp_path / "a", **{"train.optimizer": "sgd",
                                                                           "train.lr": 0.05, "train.max_steps": 2}))
    trainer = Trainer(cfg)
    step_dir = trainer.save()  # no optimizer step yet: no momentum buffers exist
    trainer.guards.close()
    with open(f"{step_dir}/manifest.json") as f:
        assert "embed.wte.weight.momentum_buffer" in json.load(f)["files"]["optim-s0.safetensors"]["tensors"]
    trainer.run()
    ref = losses(tmp_path / "a")
    cfg = load_config(None, tiny_overrides(tiny_corpus, tmp_path / "b", **{
        "train.optimizer": "sgd", "train.lr": 0.05, "train.max_steps": 2, "checkpoint.resume": step_dir}))
    Trainer(cfg).run()
    assert losses(tmp_path / "b") == ref  # resuming the step-0 save is the fresh run
    cfg = load_config(None, tiny_overrides(tiny_corpus, tmp_path / "c", **{"checkpoint.resume": step_dir}))
    with pytest.raises(ValueError, match="holds train.optimizer=sgd state but the config has adamw"):
        Trainer(cfg)
