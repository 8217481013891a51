"""Hang reports: a phase past its limit is reported once with the rank's stacks; a quick phase leaves nothing."""
import re
import time

from megatrain.distributed.watchdog import HangWatchdog


def _slow_phase_body():
    time.sleep(1.0)


def test_a_phase_past_its_limit_is_reported_with_stacks(tmp_path, capfd):
    dog = HangWatchdog(0.2, rank=3, where="tp 1 pp 0 dp 1", log_dir=str(tmp_path))
    try:
        with dog.phase("training step 7"):
            _slow_phase_body()
    finally:
        dog.close()
    err = capfd.readouterr().err
    report = (tmp_path / "hang_rank3.txt").read_text()
    for text in (err, report):
        assert re.search(r"megatrain: rank 3 \(tp 1 pp 0 dp 1\) has been in training step 7 for 0\.[2-9]s", text)
        assert "_slow_phase_body" in text  # the main thread's Python stack, where it is stuck
        assert "training step 7 finished after 1.0s" in text
        assert text.count("has been in") == 1  # one report per phase, not one per poll


def test_quick_phases_and_a_disabled_watchdog_report_nothing(tmp_path, capfd):
    dog = HangWatchdog(5.0, rank=0, where="tp 0 pp 0 dp 0", log_dir=str(tmp_path))
    for step in range(50):
        with dog.phase(f"training step {step}"):
            pass
    dog.close()
    off = HangWatchdog(0, rank=0, where="", log_dir=str(tmp_path))
    with off.phase("training step 1"):
        time.sleep(0.05)
    off.close()
    assert capfd.readouterr().err == "" and not list(tmp_path.iterdir())
