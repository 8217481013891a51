"""bench_checkpoint's writers and readers round-trip a small state dict: the benchmark keeps up with the format."""
import os
import sys

import torch

from megatrain.testing import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_checkpoint  # noqa: E402


def test_every_writer_round_trips(tmp_path):
    tensors = {"a.weight": torch.randn(8, 4), "b.bias": torch.arange(5, dtype=torch.float32)}
    for i, (name, (save, load)) in enumerate(bench_checkpoint._writers_and_readers(tensors).items()):
        d = tmp_path / str(i)
        d.mkdir()
        save(str(d))
        got = load(str(d))
        assert set(got) == set(tensors), name
        for k, v in tensors.items():
            assert torch.equal(got[k], v), (name, k)
