"""Ensemble combination on tensors and the metrics it reports."""
import pytest
import torch

from megatrain.eval.ensemble import combine, score


def test_mean_prob_and_vote():
    a = torch.tensor([[0.6, 0.4, 0.0], [0.1, 0.8, 0.1]])
    b = torch.tensor([[0.0, 0.9, 0.1], [0.2, 0.3, 0.5]])
    c = torch.tensor([[0.55, 0.45, 0.0], [0.4, 0.3, 0.3]])
    mean = combine([a, b, c], "mean_prob")
    torch.testing.assert_close(mean, ((a + b + c) / 3).double())
    assert mean.argmax(-1).tolist() == [1, 1]  # 0.583 for class 1 beats 0.383 for class 0
    assert combine([a, b, c], "vote").argmax(-1).tolist() == [0, 1]  # two of three vote 0 in row 0
    # a three-way tie in votes goes to the highest mean probability
    assert combine([a, b, c], "vote")[1].argmax().item() == 1


def test_ensemble_fixes_independent_errors():
    torch.manual_seed(0)
    n, c = 600, 4
    labels = torch.randint(0, c, (n,))
    members = []
    for _ in range(5):  # each member right 65% of the time, errors independent
        right = torch.rand(n) < 0.65
        pred = torch.where(right, labels, (labels + torch.randint(1, c, (n,))) % c)
        members.append(0.7 * torch.nn.functional.one_hot(pred, c).double() + 0.3 / c)
    best = max(score(p, labels, c)["accuracy"] for p in members)
    assert score(combine(members), labels, c)["accuracy"] > best
    assert score(combine(members, "vote"), labels, c, proper=False)["accuracy"] > best


def test_errors_and_loss():
    with pytest.raises(ValueError, match="empty"):
        combine([])
    with pytest.raises(ValueError, match="ensemble_mode"):
        combine([torch.ones(1, 2) / 2], "median")
    s = score(torch.tensor([[0.5, 0.5]]), torch.tensor([1]), 2)
    assert s["loss"] == pytest.approx(0.6931, abs=1e-4)
