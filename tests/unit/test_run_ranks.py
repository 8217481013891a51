"""The multi-rank harness itself: a failed rank is reported at once, and chatty ranks cannot stall each other."""
import time

import pytest

from megatrain.testing import run_ranks

# rank 1 writes 256 kB to stderr (4× a pipe buffer), then signals rank 0, which waits for that signal
CHATTY = """
import os, sys, time
flag = os.path.join(os.environ["FLAG_DIR"], "done")
if os.environ["RANK"] == "1":
    sys.stderr.write("x" * 262144); sys.stderr.flush(); open(flag, "w").close()
else:
    while not os.path.exists(flag):
        time.sleep(0.05)
print("rank", os.environ["RANK"], "ok")
"""


def test_ranks_that_write_more_than_a_pipe_holds_do_not_stall(tmp_path):
    results = run_ranks(2, ["-c", CHATTY], timeout=60, env={"FLAG_DIR": str(tmp_path)})
    assert [r.returncode for r in results] == [0, 0]
    assert results[0].stdout.strip() == "rank 0 ok" and len(results[1].stderr) == 262144


def test_a_failed_rank_is_reported_without_waiting_for_its_peers():
    code = "import os, sys, time\nif os.environ['RANK'] == '1': sys.exit('rank 1 broke')\ntime.sleep(120)"
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 exited with 1; stderr tail:\nrank 1 broke"):
        run_ranks(2, ["-c", code], timeout=100)
    assert time.monotonic() - t0 < 30


def test_a_hang_names_the_ranks_still_running():
    code = "import os, time\nif os.environ['RANK'] == '0': time.sleep(120)"
    with pytest.raises(RuntimeError, match=r"ranks \[0\] did not finish within 3s \(hang\)"):
        run_ranks(2, ["-c", code], timeout=3)


def test_unchecked_results_keep_every_exit_code():
    code = "import os, sys\nsys.exit(int(os.environ['RANK']) + 2)"
    assert [r.returncode for r in run_ranks(2, ["-c", code], timeout=30, check=False)] == [2, 3]
