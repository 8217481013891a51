"""Fold splitting: disjoint, covering, stratified, balanced, and clear errors."""
import json
import os

import numpy as np
import pytest

from megatrain.config import build_config
from megatrain.eval.kfold import kfold_indices, run_kfold, summarize_folds


def _check_partition(folds, n):
    vals = [va for _, va in folds]
    allv = np.concatenate(vals)
    assert len(allv) == n and len(np.unique(allv)) == n  # covering, each sample validated exactly once
    for tr, va in folds:
        assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == n  # disjoint
    sizes = [len(v) for v in vals]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("k", [2, 3, 5])
def test_stratified_partition(k):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 203)
    folds = kfold_indices(y, k, stratified=True, seed=3)
    _check_partition(folds, len(y))
    for c in range(4):
        per_fold = [int((y[va] == c).sum()) for _, va in folds]
        assert max(per_fold) - min(per_fold) <= 1  # each class spread evenly


def test_plain_partition_and_determinism():
    a = kfold_indices(17, 4, stratified=False, seed=1)
    b = kfold_indices(17, 4, stratified=False, seed=1)
    c = kfold_indices(17, 4, stratified=False, seed=2)
    _check_partition(a, 17)
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(np.array_equal(x[1], y[1]) for x, y in zip(a, c))


def test_errors():
    with pytest.raises(ValueError, match=r"eval.kfold=6 exceeds the 5 samples"):
        kfold_indices(np.arange(5), 6, stratified=False)
    with pytest.raises(ValueError, match=r"at least 2 folds"):
        kfold_indices(10, 1, stratified=False)
    y = np.array([0] * 10 + [1] * 2)
    with pytest.raises(ValueError, match=r"class 1 has only 2 samples.*eval.stratified=false"):
        kfold_indices(y, 3, stratified=True)
    assert len(kfold_indices(y, 3, stratified=False)) == 3  # allowed without stratification


def test_summary_std_is_sample_std():
    s = summarize_folds([{"accuracy": 0.9}, {"accuracy": 1.0}])
    assert s["accuracy"]["mean"] == pytest.approx(0.95)
    assert s["accuracy"]["std"] == pytest.approx(np.std([0.9, 1.0], ddof=1))


def test_run_kfold_with_stub_writes_tables_and_resumes(tmp_path):
    cfg = build_config({"model": {"arch": "resnet", "task": "classification"}, "data": {"dataset": "digits"},
                        "eval": {"kfold": 3}, "log": {"dir": str(tmp_path)}})
    y = np.repeat(np.arange(3), 6)
    calls = []

    def stub(fold_cfg, tr, va):
        calls.append(fold_cfg.log.dir)
        assert fold_cfg.eval.kfold == 0 and len(np.intersect1d(tr, va)) == 0
        return {"val_accuracy": len(calls) / 10, "val_loss": 1.0}

    out = run_kfold(cfg, train_fn=stub, pool_labels=y, log=lambda s: None)
    assert [os.path.basename(d) for d in calls] == ["fold_0", "fold_1", "fold_2"]
    assert out["summary"]["val_accuracy"]["mean"] == pytest.approx(0.2)
    assert "mean ± std" in (tmp_path / "kfold.md").read_text()
    assert json.loads((tmp_path / "kfold.json").read_text())["k"] == 3
    run_kfold(cfg, train_fn=stub, pool_labels=y, log=lambda s: None)
    assert len(calls) == 3  # finished folds are not retrained
