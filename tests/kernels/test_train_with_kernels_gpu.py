"""On a GPU: 50 bf16 training steps with the fused kernels give the torch path's losses (bf16 tolerance)."""
import json

import pytest
import torch

from megatrain.testing import run_ranks
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kernels_match_torch_over_50_steps(tiny_corpus, tmp_path, arch):
    losses = {}
    for kernels in ("torch", "triton"):
        log_dir = tmp_path / kernels
        extra = {"model.kernels": kernels, "train.precision": "bf16", "train.max_steps": 50,
                 "model.hidden_size": 128, "model.num_heads": 2}  # head dim 64: a flash-attention shape
        run_ranks(1, ["launch/pretrain.py", *tiny_overrides(tiny_corpus, log_dir, arch=arch, **extra)], timeout=900)
        losses[kernels] = [json.loads(line)["loss"] for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    ref, got = losses["torch"], losses["triton"]
    assert ref[-1] < ref[0] - 1.0
    for step, (a, b) in enumerate(zip(got, ref), start=1):
        assert abs(a - b) <= 0.02 * abs(b) + 0.02, (step, a, b)  # bf16: ~3 significant digits per op
