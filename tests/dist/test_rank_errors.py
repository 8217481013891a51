"""18.3: when one rank fails, the line every surviving rank prints last is the failing rank's reason, not its own
"Connection closed by peer"; each failure is also in <log.dir>/error_rank<R>.txt."""
import pytest

from megatrain.testing import run_ranks
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# rank 1 breaks in its third step (a bug of the kind a user meets: an exception raised on one rank only);
# the script is the real launcher with one method wrapped
FAULTY = '''
import os, runpy, sys
from megatrain.train.trainer import Trainer
step = Trainer.train_step
def broken(self):
    if self.rank == 1 and self.step == 2:
        raise RuntimeError("shard 7 of the training data is unreadable")
    return step(self)
Trainer.train_step = broken
sys.argv = ["launch/pretrain.py", *sys.argv[1:]]
runpy.run_path("launch/pretrain.py", run_name="__main__")
'''


def test_survivor_prints_the_failing_ranks_line_last(tiny_corpus, tmp_path):
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY)
    log_dir = tmp_path / "run"
    results = run_ranks(2, [str(script), *tiny_overrides(tiny_corpus, log_dir, **{"train.max_steps": 6})],
                        check=False, timeout=300)
    reason = "RuntimeError: shard 7 of the training data is unreadable"
    assert results[1].returncode == 1
    assert results[1].stderr.strip().splitlines()[-1].endswith(reason)
    assert (log_dir / "error_rank1.txt").read_text().strip() == reason
    assert results[0].returncode != 0
    assert results[0].stderr.strip().splitlines()[-1] == f"rank 1 failed: {reason}", results[0].stderr[-2000:]
    assert not (log_dir / "error_rank0.txt").exists()
