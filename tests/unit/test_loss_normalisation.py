"""Loss normalisation: a step's loss is Σ CE over every label token of the global batch / their number, whatever the
micro-batch split (docs/training.md). One process here (the split over grad_accum); tests/dist/test_packing_layouts.py
holds it across dp, pp and tp."""
import pytest
import torch

from megatrain.config import load_config
from tests.conftest import tiny_overrides
from tests.dist.packed_task import PackedMaskedTask, packed_row, true_token_mean


def _task(tmp_path, **extra):
    cfg = load_config(None, tiny_overrides(str(tmp_path / "unused"), tmp_path, arch="llama",
                                           **{"model.vocab_size": 96, **extra}))
    return PackedMaskedTask(cfg)


def test_loss_divisor_replaces_the_batch_mean(tmp_path):
    task = _task(tmp_path)
    logits = torch.randn(2, 5, 96, requires_grad=True)
    labels = torch.tensor([[1, 2, -100, -100, 3], [-100] * 5])
    mean, stats = task.loss_from_logits(logits, {"labels": labels})
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, 96), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(mean, total / 3)
    assert stats["count"].item() == 3 and stats["loss_sum"].item() == pytest.approx(total.item(), rel=1e-6)
    scaled, stats2 = task.loss_from_logits(logits, {"labels": labels, "loss_divisor": 7.5})
    torch.testing.assert_close(scaled, total / 7.5)
    assert stats2 == stats  # statistics stay true sums
    empty, _ = task.loss_from_logits(logits, {"labels": torch.full((2, 5), -100), "loss_divisor": 2.0})
    assert empty.item() == 0.0  # a micro-batch without label tokens adds nothing (no NaN)


def test_model_gets_positions_and_segments(tmp_path):
    task = _task(tmp_path)
    seen = {}

    def model(ids, **kw):
        seen.update(kw)
        return torch.zeros(*ids.shape, 96, requires_grad=True)
    batch = torch.utils.data.default_collate([packed_row(i, 32, 96) for i in range(2)])
    task.loss_and_stats(model, batch)
    assert seen.keys() == {"positions", "segments"} and seen["segments"] is batch["segments"]


def _one_step(tmp_path, name, **extra):
    """One SGD step (its update is the gradient itself; Adam's first step is ~lr·sign(g), blind to scale)."""
    from megatrain.train.trainer import Trainer
    log = tmp_path / name
    task = _task(log, **{"train.global_batch_size": 4, "train.max_steps": 1, "train.optimizer": "sgd",
                         "train.momentum": 0.0, "train.lr": 0.5, "train.warmup_steps": 0, **extra})
    trainer = Trainer(task.cfg, task)
    try:
        rows = [trainer.train_data[i] for i in trainer._global_indices(0)]
        metrics, _ = trainer.train_step()
        weights = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    finally:
        trainer.watchdog.close()
        trainer.guards.close()
    return metrics, weights, rows


@pytest.mark.slow
def test_grad_accum_split_changes_nothing(tmp_path):
    from megatrain.models.transformer import build_transformer
    ref_metrics, ref_weights, rows = _one_step(tmp_path, "m4", **{"train.micro_batch_size": 4})
    counts = [int((r["labels"] != -100).sum()) for r in rows]
    assert len(set(counts)) > 2 and min(counts) == 0  # micro-batches with very different token counts

    initial = build_transformer(_task(tmp_path).cfg.model, seed=7)
    true_mean = true_token_mean(initial, rows)
    assert ref_metrics["loss"] == pytest.approx(true_mean, rel=1e-5)  # the logged loss is the token mean
    per_micro = [true_token_mean(initial, rows[i:i + 1]) for i in range(4) if counts[i]]
    assert abs(sum(per_micro) / len(per_micro) - true_mean) > 1e-3  # a mean of means would be visibly off

    for name, extra in (("m2", {"train.micro_batch_size": 2}), ("m1", {"train.micro_batch_size": 1}),
                        ("fused", {"train.micro_batch_size": 2, "train.fused_linear_ce": True}),
                        ("ckpt", {"train.micro_batch_size": 1, "parallel.activation_checkpointing": "every"})):
        metrics, weights, _ = _one_step(tmp_path, name, **extra)
        assert metrics["loss"] == pytest.approx(true_mean, rel=1e-5), name
        for k in ref_weights:
            torch.testing.assert_close(weights[k], ref_weights[k], rtol=1e-5, atol=1e-7, msg=f"{name}: {k}")


@pytest.mark.slow
def test_a_mean_of_micro_batch_means_would_fail_the_check(tmp_path, monkeypatch):
    # the comparison above can fail: without the step's divisor (each micro-batch its own mean) the update differs
    from megatrain.train.trainer import Trainer
    _, ref_weights, _ = _one_step(tmp_path, "m4", **{"train.micro_batch_size": 4})
    real = Trainer._step_batches

    def own_means(self, indices, dataset):
        batches, total = real(self, indices, dataset)
        return [{k: v for k, v in b.items() if k != "loss_divisor"} for b in batches], total
    monkeypatch.setattr(Trainer, "_step_batches", own_means)
    _, weights, _ = _one_step(tmp_path, "m1", **{"train.micro_batch_size": 1})
    worst = max((weights[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
    assert worst > 1e-4
