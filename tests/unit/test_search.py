"""Search spaces: parsing, errors, grid/random trial lists, ranking, resumability with a stub trial."""
import json

import pytest

from megatrain.config import build_config
from megatrain.eval.search import (field_exists, grid_trials, load_space, parse_space, random_trials, run_search,
                                   trial_config)


def test_field_exists():
    assert field_exists("train.lr") and field_exists("model.widths") and field_exists("data.augment")
    assert not field_exists("train.lrr") and not field_exists("train") and not field_exists("train.lr.x")


@pytest.mark.parametrize("space,match", [
    ({"train.lrr": [1e-3]}, "unknown config field 'train.lrr'"),
    ({"lr": [1e-3]}, "unknown config field 'lr'"),
    ({"train.lr": []}, "empty list"),
    ({"train.lr": {"low": 1e-2, "high": 1e-3}}, "low=0.01 > high=0.001"),
    ({"train.lr": {"low": 0.0, "high": 1e-3, "log": True}}, "log range needs low > 0"),
    ({"train.lr": {"low": 1e-3}}, "range must be"),
    ({"train.lr": 0.1}, "must be a list"),
    ({"log.dir": ["a"]}, "cannot be searched"),
    ({}, "non-empty mapping"),
])
def test_bad_spaces(space, match):
    with pytest.raises(ValueError, match=match):
        parse_space(space, method="random")


def test_grid_rejects_ranges_and_enumerates_lists():
    with pytest.raises(ValueError, match="grid search cannot enumerate"):
        parse_space({"train.lr": {"low": 1e-3, "high": 1e-2}}, method="grid")
    trials = grid_trials(parse_space({"train.lr": [1e-3, 1e-2], "model.widths": [[8], [16], [32]]}, method="grid"))
    assert len(trials) == 6 and {"train.lr": 1e-3, "model.widths": [16]} in trials


def test_random_trials_reproducible_and_in_range():
    space = parse_space({"train.lr": {"low": 1e-4, "high": 1e-1, "log": True},
                         "train.max_steps": {"low": 10, "high": 20, "int": True},
                         "train.optimizer": ["adamw", "sgd"]}, method="random")
    a, b = random_trials(space, 20, seed=5), random_trials(space, 20, seed=5)
    assert a == b and a != random_trials(space, 20, seed=6)
    assert all(1e-4 <= t["train.lr"] <= 1e-1 and 10 <= t["train.max_steps"] <= 20 for t in a)
    assert all(isinstance(t["train.max_steps"], int) for t in a)


def test_load_space_file_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_space(str(tmp_path / "missing.yaml"), method="grid")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train.lr: [1e-3\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_space(str(bad), method="grid")


def test_trial_config_validates_values(tmp_path):
    cfg = build_config({"log": {"dir": str(tmp_path)}})
    t = trial_config(cfg, {"train.lr": 0.5}, str(tmp_path / "trial_000"))
    assert t.train.lr == 0.5 and t.log.dir.endswith("trial_000")
    with pytest.raises(ValueError, match="train.lr"):
        trial_config(cfg, {"train.lr": -1.0}, str(tmp_path / "trial_001"))


class _Interrupted(Exception):
    pass


def test_run_search_ranks_and_resumes(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text("train.lr: [0.1, 0.3, 0.2]\ntrain.weight_decay: [0.0]\n")
    cfg = build_config({"search": {"space": str(space_file), "method": "grid", "mode": "max"},
                        "eval": {"metric": "accuracy"}, "log": {"dir": str(tmp_path / "s")}})
    calls = []

    def stub(tcfg):
        calls.append(tcfg.train.lr)
        if len(calls) == 2:
            raise _Interrupted  # the run dies during the second trial
        return {"val_accuracy": tcfg.train.lr, "val_loss": 1 - tcfg.train.lr}

    with pytest.raises(_Interrupted):
        run_search(cfg, train_fn=stub, log=lambda s: None)
    assert (tmp_path / "s" / "trial_000" / "result.json").is_file()
    assert not (tmp_path / "s" / "trial_001" / "result.json").exists()
    calls[:] = [None, None, None]  # past the interrupting call
    ranked = run_search(cfg, train_fn=stub, log=lambda s: None)
    assert calls[3:] == [0.3, 0.2]  # trial 0 was finished and not rerun
    assert [r["params"]["train.lr"] for r in ranked] == [0.3, 0.2, 0.1]
    table = (tmp_path / "s" / "search.md").read_text()
    assert "val_accuracy" in table or "accuracy" in table
    data = json.loads((tmp_path / "s" / "search.json").read_text())
    assert data["ranked"][0]["trial"] == 1


def test_changed_space_is_refused(tmp_path):
    cfg = build_config({"search": {"method": "grid"}, "log": {"dir": str(tmp_path)}})
    run_search(cfg, space={"train.lr": [0.1]}, train_fn=lambda t: {"val_loss": 1.0}, log=lambda s: None)
    with pytest.raises(ValueError, match="other parameters"):
        run_search(cfg, space={"train.lr": [0.2]}, train_fn=lambda t: {"val_loss": 1.0}, log=lambda s: None)


def test_unknown_metric(tmp_path):
    cfg = build_config({"search": {"method": "grid"}, "eval": {"metric": "bleu"}, "log": {"dir": str(tmp_path)}})
    with pytest.raises(ValueError, match="eval.metric=bleu"):
        run_search(cfg, space={"train.lr": [0.1]}, train_fn=lambda t: {"val_loss": 1.0}, log=lambda s: None)


def _tpe_cfg(tmp_path, trials):
    return build_config({"search": {"method": "tpe", "trials": trials, "mode": "min"}, "eval": {"metric": "loss"},
                         "log": {"dir": str(tmp_path)}})


TPE_SPACE = {"train.lr": {"low": 1e-4, "high": 1.0, "log": True}, "model.widths": [[8, 16], [16, 32], [32, 64]],
             "train.max_steps": {"low": 10, "high": 40, "int": True}}


def _bowl(tcfg):
    """A smooth stand-in for a validation loss: best at lr=1e-2, widths [16, 32], 25 steps."""
    import math
    loss = (math.log10(tcfg.train.lr) + 2) ** 2 + (tcfg.model.widths[0] != 16) + abs(tcfg.train.max_steps - 25) / 15
    return {"val_loss": loss}


def test_tpe_maps_choices_and_beats_random_late(tmp_path):
    from megatrain.eval.search import random_trials

    rows = run_search(_tpe_cfg(tmp_path / "tpe", 24), space=TPE_SPACE, train_fn=_bowl, log=lambda s: None)
    assert len(rows) == 24 and all(r["params"]["model.widths"] in TPE_SPACE["model.widths"] for r in rows)
    assert all(isinstance(r["params"]["train.max_steps"], int) and 10 <= r["params"]["train.max_steps"] <= 40
               for r in rows)
    # once the density model has data, TPE's proposals are better on average than random draws
    late = sorted(rows, key=lambda r: r["trial"])[12:]
    tpe_late = sum(r["metrics"]["val_loss"] for r in late) / len(late)
    space = parse_space(TPE_SPACE, method="random")
    cfg = _tpe_cfg(tmp_path, 1)
    rand = [_bowl(trial_config(cfg, p, str(tmp_path / "r")))["val_loss"] for p in random_trials(space, 12, seed=1234)]
    assert tpe_late < sum(rand) / len(rand)


def test_tpe_resumes_without_rerunning(tmp_path):
    calls, die_at = [], [3]

    def stub(tcfg):
        calls.append(tcfg.log.dir)
        if len(calls) == die_at[0]:
            raise _Interrupted  # the run dies during the third trial
        return _bowl(tcfg)

    cfg = _tpe_cfg(tmp_path, 5)
    with pytest.raises(_Interrupted):
        run_search(cfg, space=TPE_SPACE, train_fn=stub, log=lambda s: None)
    calls.clear()
    die_at[0] = 0
    ranked = run_search(cfg, space=TPE_SPACE, train_fn=stub, log=lambda s: None)
    assert [c[-9:] for c in calls] == ["trial_002", "trial_003", "trial_004"]
    assert len(ranked) == 5 and ranked[0]["metrics"]["val_loss"] <= ranked[-1]["metrics"]["val_loss"]
    with pytest.raises(ValueError, match="other fields"):
        run_search(cfg, space={"train.lr": [0.1]}, train_fn=stub, log=lambda s: None)
