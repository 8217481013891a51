"""Hang reports across ranks: a rank late to a collective shows up as the odd one out in the reports, and the
Trainer reports its phases on every rank."""
import re

import pytest

from megatrain.testing import run_ranks
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.dist]

# rank 1 is busy elsewhere (a slow data read, say) while rank 0 already waits in the step's all-reduce
LATE_PEER = """
import os, sys, time
import torch, torch.distributed as dist
from megatrain.distributed.watchdog import HangWatchdog
dist.init_process_group("gloo")
rank = dist.get_rank()
dog = HangWatchdog(0.5, rank=rank, where=f"dp {rank}", log_dir=sys.argv[1])

def read_next_batch():
    time.sleep(3)

with dog.phase("training step 12"):
    if rank == 1:
        read_next_batch()
    dist.all_reduce(torch.ones(4))
dog.close()
dist.destroy_process_group()
"""


def test_the_rank_holding_up_a_collective_is_the_odd_one_out(tmp_path):
    run_ranks(2, ["-c", LATE_PEER, str(tmp_path)], timeout=60)
    waiting, late = (tmp_path / "hang_rank0.txt").read_text(), (tmp_path / "hang_rank1.txt").read_text()
    assert "rank 0 (dp 0) has been in training step 12" in waiting and "all_reduce" in waiting
    assert "rank 1 (dp 1) has been in training step 12" in late and "read_next_batch" in late
    assert "all_reduce" not in late.split("finished after")[0]


def test_trainer_reports_its_phases_on_every_rank(tiny_corpus, tmp_path):
    # a limit far below any setup's duration: every rank must report its setup phase and its end
    results = run_ranks(2, ["launch/pretrain.py", *tiny_overrides(tiny_corpus, tmp_path, **{
        "train.max_steps": 2, "log.hang_report_s": 0.001})], timeout=300)
    for r in results:
        report = (tmp_path / f"hang_rank{r.rank}.txt").read_text()
        # reported before or after the layout's groups exist: "(of 2)" or "(tp 0 pp 0 dp R)"
        assert re.search(rf"rank {r.rank} \((of 2|tp 0 pp 0 dp {r.rank})\) has been in setup", report)
        assert "setup (model build, deepspeed.initialize, weights, resume) finished after" in report
        assert "has been in setup" in r.stderr
