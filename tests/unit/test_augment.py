"""Augmentation: determinism per (seed, epoch, index), shapes, labels, identity at zero strength."""
import numpy as np
import pytest
import torch

from megatrain.config import build_config
from megatrain.data.augment import DIGITS, AugmentSpec, augment_batch, augment_image, random_affine, sample_seed
from megatrain.data.images import channel_stats, load_digits_arrays, stratified_split


@pytest.fixture(scope="module")
def digits():
    return load_digits_arrays()


def test_deterministic_and_varies(digits):
    x = torch.from_numpy(digits.x[:8])
    idx = torch.arange(100, 108)
    a = augment_batch(x, idx, DIGITS, seed=1, epoch=3)
    b = augment_batch(x, idx, DIGITS, seed=1, epoch=3)
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.allclose(a, augment_batch(x, idx, DIGITS, seed=1, epoch=4))
    assert not torch.allclose(a, augment_batch(x, idx, DIGITS, seed=2, epoch=3))
    # a sample's draw depends on its index, not on its batch position or batch-mates (so ranks agree)
    single = augment_image(x[5], DIGITS, seed=1, epoch=3, index=105)
    torch.testing.assert_close(a[5], single)
    perm = torch.tensor([5, 0, 3])
    torch.testing.assert_close(augment_batch(x[perm], idx[perm], DIGITS, seed=1, epoch=3)[0], a[5])


def test_identity_spec_is_identity(digits):
    spec = AugmentSpec(rotation_deg=0.0, scale=(1.0, 1.0), translate=0.0)
    x = torch.from_numpy(digits.x[:4])
    torch.testing.assert_close(augment_batch(x, torch.arange(4), spec, seed=0, epoch=0), x, atol=1e-5, rtol=0)


def test_flip_probability_one_mirrors():
    spec = AugmentSpec(rotation_deg=0.0, scale=(1.0, 1.0), translate=0.0, hflip=1.0)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    torch.testing.assert_close(augment_image(x[0], spec, seed=0, epoch=0, index=0), x[0].flip(-1), atol=1e-5, rtol=0)


def test_parameters_in_range():
    gen = torch.Generator().manual_seed(0)
    theta = random_affine(DIGITS, gen, n=2000)  # (n, 2, 3)
    scale = 1 / theta[:, :, :2].det().abs().sqrt()
    assert scale.min() >= DIGITS.scale[0] - 1e-4 and scale.max() <= DIGITS.scale[1] + 1e-4
    assert theta[:, :, 2].abs().max() <= 2 * DIGITS.translate + 1e-6
    assert sample_seed(1, 2, 3) != sample_seed(1, 3, 2)


def test_bad_spec():
    with pytest.raises(ValueError, match="scale"):
        AugmentSpec(scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="probabilities"):
        AugmentSpec(hflip=1.5)


def test_split_stratified_deterministic_and_stats(digits):
    tr, va = stratified_split(digits.y, 0.2, seed=0)
    tr2, va2 = stratified_split(digits.y, 0.2, seed=0)
    assert np.array_equal(va, va2) and len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(digits.y)
    for c in range(10):
        frac = (digits.y[va] == c).sum() / (digits.y == c).sum()
        assert abs(frac - 0.2) < 0.02
    mean, std = channel_stats(digits.x[tr])
    assert mean.shape == (1,) and np.isclose(mean[0], digits.x[tr].mean(), atol=1e-6)


def test_task_augments_only_in_training_and_keeps_labels():
    from torch.utils.data import default_collate

    from megatrain.train.classification_task import ClassificationTask

    cfg = build_config({"model": {"arch": "resnet", "task": "classification", "widths": [8], "blocks_per_stage": [1]},
                        "data": {"dataset": "digits", "augment": True, "val_fraction": 0.2}})
    task = ClassificationTask(cfg)
    batch = default_collate([task.train_dataset()[i] for i in range(6)])
    labels = batch["label"].clone()
    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    model.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    model.train()
    task.set_epoch(0)
    _, stats = task.loss_and_stats(model, batch)
    task.loss_and_stats(model, batch)
    model.eval()
    task.loss_and_stats(model, batch)
    assert torch.equal(batch["label"], labels) and stats["count"].item() == 6
    assert torch.equal(seen[0], seen[1])  # same (seed, epoch, index) -> same pixels
    assert not torch.allclose(seen[0], seen[2])  # eval sees the un-augmented images
    assert seen[2].view(6, 1, 8, 8).mean() == pytest.approx(
        float((task.pool.x[batch["index"].numpy()].mean() - task.mean) / task.std), abs=1e-5)
