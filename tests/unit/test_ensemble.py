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


def test_train_members_seeds_resume_and_errors(tmp_path):
    from megatrain.config import load_config
    from megatrain.eval.ensemble import train_members

    cfg = load_config("recipes/ensemble_digits.yaml", [f"--log.dir={tmp_path}"])
    seen = []

    def fake_train(c):  # records what each member would train with
        seen.append((c.train.seed, c.log.dir, c.checkpoint.save_final, c.eval.ensemble_members))
        return {"val_accuracy": 0.9}

    paths = train_members(cfg, train_fn=fake_train, log=lambda s: None)
    assert paths == [str(tmp_path / f"member_{i}") for i in range(3)]
    assert seen == [(1234 + i, paths[i], True, 0) for i in range(3)]
    seen.clear()
    assert train_members(cfg, train_fn=fake_train, log=lambda s: None) == paths and seen == []  # resumed
    changed = load_config("recipes/ensemble_digits.yaml", [f"--log.dir={tmp_path}", "--train.seed=7"])
    with pytest.raises(ValueError, match="other parameters"):
        train_members(changed, train_fn=fake_train, log=lambda s: None)
    with pytest.raises(ValueError, match="at least 2 members"):
        train_members(load_config("recipes/ensemble_digits.yaml", ["--eval.ensemble_members=1"]))
    with pytest.raises(ValueError, match="both set"):
        train_members(load_config("recipes/ensemble_digits.yaml", ["--eval.ensemble=[runs/a]"]))


def test_eval_batch_count():
    from megatrain.data.sampler import eval_batch_count

    assert eval_batch_count(5, 359, micro_batch_size=32) == 5
    assert eval_batch_count(0, 359, micro_batch_size=32) == 12  # 12 × 32 ≥ 359
    assert eval_batch_count(0, 359, micro_batch_size=32, dp_size=2) == 6
    assert eval_batch_count(0, 0, micro_batch_size=32) == 1
