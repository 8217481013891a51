"""train.nonfinite on the real Trainer (one rank, in-process): a poisoned step is never applied, each policy does
what it says, and a checkpoint with a non-finite tensor is never written nor becomes latest."""
import json
import math
import os

import pytest
import torch

from megatrain.config import load_config
from megatrain.train.nonfinite import NonFiniteError, NonFinitePolicy
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


class PoisonedTask:
    """The LM task whose loss is NaN in the steps (0-based) listed in ``bad``; knows the step via ``trainer``."""

    def __init__(self, task, bad: set[int]):
        self._task, self.bad, self.trainer = task, bad, None

    def __getattr__(self, name):
        return getattr(self._task, name)

    def loss_and_stats(self, model, batch):
        loss, stats = self._task.loss_and_stats(model, batch)
        if self.trainer is not None and self.trainer.step in self.bad:
            loss = loss * float("nan")
            stats = {**stats, "loss_sum": stats["loss_sum"] * float("nan")}
        return loss, stats


def make_trainer(corpus, log_dir, bad, **extra):
    from megatrain.train.tasks import make_task
    from megatrain.train.trainer import Trainer
    cfg = load_config(None, tiny_overrides(corpus, log_dir, **{"train.max_steps": 6, **extra}))
    task = PoisonedTask(make_task(cfg), set(bad))
    trainer = Trainer(cfg, task=task)
    task.trainer = trainer
    return trainer


def records(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def manifest(log_dir, tag=None):
    ckpt = os.path.join(log_dir, "checkpoints")
    tag = tag or open(os.path.join(ckpt, "latest")).read().strip()
    with open(os.path.join(ckpt, tag, "manifest.json")) as f:
        return json.load(f)


def params(trainer):
    return {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}


def test_skip_leaves_the_weights_untouched_and_goes_on(tiny_corpus, tmp_path):
    trainer = make_trainer(tiny_corpus, tmp_path, bad={2}, **{"checkpoint.save_final": True})
    trainer.cfg.train.max_steps = 2
    trainer.run()
    before = params(trainer)
    trainer.cfg.train.max_steps = 3  # step 3 (index 2) is poisoned
    trainer.run()
    after = params(trainer)
    assert all(torch.equal(before[n], after[n]) for n in before)  # the optimizer did not apply it
    trainer.cfg.train.max_steps = 6
    trainer.run()
    rows = records(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert math.isnan(rows[2]["loss"]) and all(math.isfinite(r["loss"]) for r in rows if r["step"] != 3)
    assert manifest(tmp_path)["optimizer_step"] == 5  # 6 steps, one not applied


def test_skip_stops_after_max_consecutive(tiny_corpus, tmp_path):
    trainer = make_trainer(tiny_corpus, tmp_path, bad={1, 2, 3, 4},
                           **{"train.max_nonfinite_skips": 2, "checkpoint.every": 1, "checkpoint.keep_last": 10})
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps up to step 4 .*max_nonfinite_skips=2"):
        trainer.run()


def test_stop_names_the_step_and_saves_nothing_after_it(tiny_corpus, tmp_path):
    trainer = make_trainer(tiny_corpus, tmp_path, bad={2}, **{"train.nonfinite": "stop", "checkpoint.every": 2})
    with pytest.raises(NonFiniteError, match=r"at step 3 \(train.nonfinite=stop\).*step_00000002"):
        trainer.run()
    assert open(tmp_path / "checkpoints" / "latest").read() == "step_00000002"
    assert "\n" not in str(NonFiniteError("x"))


def test_rollback_reloads_and_skips_the_batch(tiny_corpus, tmp_path):
    ref = make_trainer(tiny_corpus, tmp_path / "ref", bad=set())
    ref.run()
    ref_loss = {r["step"]: r["loss"] for r in records(tmp_path / "ref")}
    trainer = make_trainer(tiny_corpus, tmp_path / "run", bad={3},
                           **{"train.nonfinite": "rollback", "checkpoint.every": 2, "checkpoint.save_final": True})
    trainer.run()
    rows = records(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 5, 6]  # step 4's batch is skipped after the rollback to step 2
    got = {r["step"]: r["loss"] for r in rows}
    assert got[3] == ref_loss[3]  # the re-run step 3 starts from the reloaded step-2 state exactly
    assert all(math.isfinite(v) for v in got.values())
    assert manifest(tmp_path / "run")["skipped_batches"] == [3]


def test_a_nonfinite_checkpoint_is_never_written(tiny_corpus, tmp_path):
    from megatrain.checkpoint.layout_free import SaveError
    trainer = make_trainer(tiny_corpus, tmp_path, bad=set(), **{"train.max_steps": 2, "checkpoint.save_final": True})
    trainer.run()
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
    p = next(trainer.engine.module.parameters())
    value = safe_get_full_fp32_param(p).clone()
    value.view(-1)[0] = float("inf")
    safe_set_full_fp32_param(p, value)  # the ZeRO master the checkpoint is written from
    trainer.step = 3
    with pytest.raises(SaveError, match=r"step 3 failed on rank 0: tensor .* is not finite.*latest still points to "
                                        r"step_00000002"):
        trainer.save()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_00000002"]


def test_policy_unit():
    p = NonFinitePolicy("skip", 1)
    assert p.decide(1, False, last_good=None) == "ok"
    assert p.decide(2, True, last_good=None) == "skip"
    assert p.decide(3, False, last_good=None) == "ok"  # the count is of consecutive steps
    assert p.decide(4, True, last_good=None) == "skip"
    with pytest.raises(NonFiniteError, match="2 consecutive steps up to step 5"):
        p.decide(5, True, last_good=None)
    with pytest.raises(NonFiniteError, match="no checkpoint"):
        NonFinitePolicy("rollback", 3).decide(1, True, last_good=None)
