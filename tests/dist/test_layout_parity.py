"""Loss parity across parallel layouts: the project's guard against silent divergence.

Same seed, same data, 10 steps of the tiny GPT-2 (tied embeddings, learned positions, biases) and the tiny
Llama (GQA, RoPE, SwiGLU, untied): every (tp, pp, dp) layout must give the one-process losses.

Tolerance: 2e-5 relative. Every layout computes the same fp32 math; what differs is reduction order —
partial sums of row-parallel matmuls added across tp ranks, gradients averaged over dp instead of
accumulated over micro-batches, vocab-parallel log-sum-exp assembled from shards. Each reorder moves an
fp32 result by ~1e-7 relative; Adam's normalised updates keep that from growing much over 10 steps (the
observed spread is ~2e-7), so 2e-5 leaves margin while a real bug (a wrong shard, a missing all-reduce,
padding in the softmax) moves step-1 loss by >1e-4 and later steps by far more.
"""
import json

import pytest

from megatrain.testing import run_ranks
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]

LAYOUTS = [  # (tp, pp, dp, sequence_parallel)
    (2, 1, 1, False), (1, 2, 1, False), (1, 1, 2, False), (2, 2, 1, False), (2, 1, 2, False), (2, 2, 2, False),
]
EXTRA = {"gpt2": [(2, 1, 2, True)], "llama": [(2, 2, 1, True)]}
STEPS = 10


def _losses(log_dir) -> list[float]:
    with open(log_dir / "metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


def _train(corpus, log_dir, arch, tp=1, pp=1, dp=1, sp=False):
    extra = {"parallel.tp": tp, "parallel.pp": pp, "parallel.sequence_parallel": sp, "train.max_steps": STEPS,
             "train.micro_batch_size": 2, "train.global_batch_size": 8}
    run_ranks(tp * pp * dp, ["launch/pretrain.py", *tiny_overrides(corpus, log_dir, arch=arch, **extra)], timeout=600)
    return _losses(log_dir)


@pytest.fixture(scope="module")
def references(tiny_corpus, tmp_path_factory):
    return {arch: _train(tiny_corpus, tmp_path_factory.mktemp(f"ref_{arch}"), arch) for arch in ("gpt2", "llama")}


@pytest.mark.parametrize("arch, layout", [(a, lay) for a in ("gpt2", "llama") for lay in LAYOUTS + EXTRA[a]],
                         ids=lambda v: v if isinstance(v, str) else "tp{}pp{}dp{}{}".format(*v[:3], "sp" if v[3] else ""))
def test_layout_matches_one_process(tiny_corpus, tmp_path, references, arch, layout):
    tp, pp, dp, sp = layout
    got = _train(tiny_corpus, tmp_path, arch, tp, pp, dp, sp)
    ref = references[arch]
    assert len(got) == STEPS and ref[-1] < ref[0]
    for step, (a, b) in enumerate(zip(got, ref), start=1):
        assert a == pytest.approx(b, rel=2e-5), f"{arch} tp{tp} pp{pp} dp{dp} sp={sp}: step {step} {a} vs {b}"


def test_bad_layout_fails_before_any_process_group(tiny_corpus, tmp_path):
    results = run_ranks(2, ["launch/pretrain.py", *tiny_overrides(tiny_corpus, tmp_path, **{"parallel.tp": 3})],
                        timeout=120, check=False)
    for r in results:
        assert r.returncode == 2
        assert "error: parallel.tp*parallel.pp=3 does not divide world size 2" in r.stderr
