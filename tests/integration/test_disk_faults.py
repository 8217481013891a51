"""Disk faults during a save, on a real full filesystem (a small tmpfs; needs root to mount, skipped otherwise):
one line on every rank, no debris, latest unchanged, and the run stops or goes on as checkpoint.on_save_error says."""
import errno
import os
import subprocess

import pytest

from megatrain.testing import run_ranks
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.dist]

# the tiny model's checkpoint is ~1.6 MB (fp32 weights + two moments): 2.5 MB holds one, not two
TMPFS_SIZE = "2500k"


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def run(corpus, log_dir, disk, **extra):
    overrides = tiny_overrides(corpus, log_dir, **{"train.max_steps": 4, "checkpoint.every": 2,
                                                   "checkpoint.keep_last": 1, "checkpoint.dir": str(disk), **extra})
    return run_ranks(2, ["launch/pretrain.py", *overrides], check=False, timeout=400)


def test_enospc_stops_every_rank_with_one_line(tiny_corpus, tmp_path, small_disk):
    results = run(tiny_corpus, tmp_path, small_disk)
    for r in results:
        assert r.returncode == 2, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error: checkpoint save at step 4 failed on rank 0: No space left on device"), last
        assert "latest still points to step_00000002" in last
    assert sorted(os.listdir(small_disk)) == ["latest", "step_00000002"]  # no .tmp-step_* debris
    assert (small_disk / "latest").read_text() == "step_00000002"


def test_enospc_with_continue_trains_on(tiny_corpus, tmp_path, small_disk):
    results = run(tiny_corpus, tmp_path, small_disk, **{"checkpoint.on_save_error": "continue"})
    for r in results:
        assert r.returncode == 0, r.stderr[-2000:]
        assert "warning: checkpoint save at step 4 failed on rank 0: No space left on device" in r.stdout
    assert sorted(os.listdir(small_disk)) == ["latest", "step_00000002"]


def test_eio_while_writing_is_handled_like_enospc(tiny_corpus, tmp_path, monkeypatch):
    """EIO cannot be provoked on a healthy disk: the writer raises it in-process, through the same save path."""
    from megatrain.checkpoint import layout_free
    from megatrain.checkpoint.layout_free import SaveError
    from megatrain.config import load_config
    from megatrain.train.trainer import Trainer
    cfg = load_config(None, tiny_overrides(tiny_corpus, tmp_path, **{"train.max_steps": 2,
                                                                     "checkpoint.save_final": True}))
    trainer = Trainer(cfg)
    trainer.run()

    def broken(path, tensors):
        open(path, "wb").close()  # a partial file is left, as a real failed write would
        raise OSError(errno.EIO, os.strerror(errno.EIO), path)
    monkeypatch.setattr(layout_free, "write_tensors", broken)
    trainer.step = 3
    with pytest.raises(SaveError, match=r"step 3 failed on rank 0: Input/output error writing .*model-s0"):
        trainer.save()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_00000002"]
