"""Trainer on real ranks (gloo): ZeRO-1/2/3 on 2 ranks give the one-process losses; resume is exact.

Tolerance: 1e-5 relative in fp32. The runs differ only in reduction order (gradients averaged over 2 ranks
vs accumulated over 2 micro-batches in one process), which perturbs fp32 sums at ~1e-7 per op; over 5
Adam steps of a tiny model that stays orders of magnitude below 1e-5.
"""
import json

import pytest

from megatrain.testing import run_ranks
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def losses(log_dir) -> dict[int, float]:
    with open(log_dir / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def run(corpus, log_dir, world, **extra):
    run_ranks(world, ["launch/pretrain.py", *tiny_overrides(corpus, log_dir, **extra)], timeout=400)
    return losses(log_dir)


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    return run(tiny_corpus, tmp_path_factory.mktemp("ref"), 1, **{"parallel.zero_stage": 0})


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_matches_one_process(tiny_corpus, tmp_path, reference, stage):
    got = run(tiny_corpus, tmp_path, 2, **{"parallel.zero_stage": stage})
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), (stage, step)
    assert reference[5] < reference[1]


def test_resume_continues_the_same_curve(tiny_corpus, tmp_path, reference):
    extra = {"parallel.zero_stage": 1, "checkpoint.every": 3}
    run(tiny_corpus, tmp_path, 2, **extra, **{"train.max_steps": 3})
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000003"
    got = run(tiny_corpus, tmp_path, 2, **extra, **{"checkpoint.resume": "auto"})
    assert sorted(got) == [1, 2, 3, 4, 5]  # the log continues; steps 4-5 come from the resumed run
    for step in (4, 5):
        assert got[step] == pytest.approx(reference[step], rel=1e-5), step
