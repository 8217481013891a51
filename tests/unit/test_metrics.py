"""Metrics against scikit-learn, including exact aggregation over 2 real gloo ranks."""
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn import metrics as skm

from megatrain.train.metrics import (all_reduce_stats, classification_metrics, confusion_matrix, per_class_metrics,
                                    perplexity)


def _sk(y, p):
    out = {"accuracy": skm.accuracy_score(y, p)}
    for avg in ("macro", "micro"):
        out[f"precision_{avg}"] = skm.precision_score(y, p, average=avg, zero_division=0)
        out[f"recall_{avg}"] = skm.recall_score(y, p, average=avg, zero_division=0)
        out[f"f1_{avg}"] = skm.f1_score(y, p, average=avg, zero_division=0)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_random(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 6, 300)
    p = np.where(rng.random(300) < 0.6, y, rng.integers(0, 6, 300))
    cm = confusion_matrix(torch.from_numpy(p), torch.from_numpy(y), 6)
    np.testing.assert_array_equal(cm.numpy(), skm.confusion_matrix(y, p, labels=range(6)))
    ours, ref = classification_metrics(cm), _sk(y, p)
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v, abs=1e-12), k


def test_absent_classes_follow_sklearn():
    # class 3 never occurs (excluded from macro, as scikit-learn does); class 2 is predicted but never true
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0, 2, 1, 1, 0, 0])
    ours = classification_metrics(confusion_matrix(torch.from_numpy(p), torch.from_numpy(y), 4))
    for k, v in _sk(y, p).items():
        assert ours[k] == pytest.approx(v, abs=1e-12), k
    per = per_class_metrics(confusion_matrix(torch.from_numpy(p), torch.from_numpy(y), 4))
    np.testing.assert_allclose(per["recall"][:2], skm.recall_score(y, p, average=None, labels=[0, 1]))


def test_empty_confusion_and_perplexity():
    with pytest.raises(ValueError, match="empty"):
        classification_metrics(torch.zeros(3, 3))
    assert perplexity(2.0 * 10, 10) == pytest.approx(math.exp(2.0))
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="count=0"):
        perplexity(1.0, 0)


def test_all_reduce_without_group_is_local():
    stats = {"count": torch.tensor(3.0), "confusion": torch.eye(2, dtype=torch.long)}
    out = all_reduce_stats(stats, None)
    assert torch.equal(out["confusion"], stats["confusion"]) and out["count"] is not stats["count"]


def _rank_main(rank, world, init_file, y, p, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # Deliberately uneven shards: rank 0 holds 70 samples, rank 1 the other 230. Averaging per-rank
    # accuracies would be wrong here; summing counts is exact.
    cut = 70
    ys, ps = (y[:cut], p[:cut]) if rank == 0 else (y[cut:], p[cut:])
    yt, pt = torch.from_numpy(ys), torch.from_numpy(ps)
    stats = {"confusion": confusion_matrix(pt, yt, 5), "count": torch.tensor(float(len(ys))),
             "loss_sum": torch.tensor(0.5 * len(ys), dtype=torch.float32)}
    group = dist.new_group([0, 1])
    out = all_reduce_stats(stats, group)
    if rank == 0:
        torch.save({"metrics": classification_metrics(out["confusion"]), "count": out["count"],
                    "loss_sum": out["loss_sum"], "confusion": out["confusion"]}, out_file)
    dist.barrier(group)
    dist.destroy_process_group()


def test_two_rank_aggregation_equals_sklearn_on_all():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 5, 300)
    p = np.where(rng.random(300) < 0.7, y, rng.integers(0, 5, 300))
    with tempfile.TemporaryDirectory() as d:
        out_file = os.path.join(d, "out.pt")
        mp.start_processes(_rank_main, args=(2, os.path.join(d, "rdzv"), y, p, out_file), nprocs=2,
                           start_method="spawn")
        got = torch.load(out_file, weights_only=True)
    assert got["count"].item() == 300 and got["loss_sum"].item() == pytest.approx(150.0)
    assert got["confusion"].dtype == torch.long
    np.testing.assert_array_equal(got["confusion"].numpy(), skm.confusion_matrix(y, p, labels=range(5)))
    for k, v in _sk(y, p).items():
        assert got["metrics"][k] == pytest.approx(v, abs=1e-12), k
