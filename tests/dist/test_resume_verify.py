"""Multi-rank resume: each checkpoint file is checksummed by exactly one rank, and a corrupt file stops every
rank with the same one line before any of them loads."""
import os

import pytest

from megatrain.checkpoint.layout_free import verification_share
from megatrain.testing import run_ranks
from tests.conftest import tiny_overrides


def test_shares_cover_every_file_once_and_balance_bytes():
    sizes = {"model_a.safetensors": 900, "model_b.safetensors": 500, "optim_a.safetensors": 450, "optim_b.safetensors": 40}
    manifest = {"files": {f: {"bytes": b, "tensors": {}} for f, b in sizes.items()}}
    shares = [verification_share(manifest, rank=r, world=2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(sizes)
    loads = [sum(sizes[f] for f in s) for s in shares]
    assert loads == [940, 950]  # largest first, each to the rank with fewer bytes so far
    assert verification_share(manifest, rank=3, world=4) == ["optim_b.safetensors"]


@pytest.mark.dist
@pytest.mark.slow
def test_a_corrupt_file_stops_both_ranks_with_the_same_line(tiny_corpus, tmp_path):
    log_dir = tmp_path / "run"
    run_ranks(2, ["launch/pretrain.py", *tiny_overrides(tiny_corpus, log_dir, **{"train.max_steps": 2, "checkpoint.save_final": True})], timeout=300)
    step_dir = max((log_dir / "checkpoints").glob("step_*"))
    # the file the second rank checksums: a flipped byte near its end (inside tensor data, not the header)
    import json
    manifest = json.loads((step_dir / "manifest.json").read_text())
    victim = step_dir / verification_share(manifest, rank=1, world=2)[0]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    results = run_ranks(2, ["launch/pretrain.py", *tiny_overrides(tiny_corpus, log_dir, **{
        "train.max_steps": 3, "checkpoint.resume": str(step_dir)})], check=False, timeout=300)
    lines = [r.stderr.strip().splitlines()[-1] for r in results]
    assert all(r.returncode == 2 for r in results), [r.stderr[-1500:] for r in results]
    assert lines[0] == lines[1] and "fails its checksum" in lines[0] and os.path.basename(str(victim)) in lines[0]
