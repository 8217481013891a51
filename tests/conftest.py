"""Shared test setup: CPU accelerator for DeepSpeed, GPU tests skipped without CUDA, tiny fixtures."""
import os
import sys

import pytest
import torch

# Triton reads TRITON_INTERPRET when triton.language is first imported (its @jit standard-library functions are
# built then), and several libraries a test imports (transformers, torch's own triton ops) import it: set it
# before any test module is collected, not only in tests/kernels, or the interpreter meets compiled helpers.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatrain.toolchain import prepare_process  # noqa: E402

prepare_process()  # DS_ACCELERATOR=cpu without CUDA and the venv's ninja, for in-process DeepSpeed and builds
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: it holds directory names too
            item.add_marker(skip_gpu)


TINY_MODELS = {
    "gpt2": {"arch": "gpt2", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_seq_len": 32},
    "llama": {"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "ffn_hidden_size": 128, "max_seq_len": 32, "norm_eps": 1e-6},
}
TINY_LR = 1e-3  # tiny_overrides' train.lr


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A prepared token corpus (~300 kB of stdlib sources, 512-token sentencepiece vocab), once per session."""
    from megatrain.config import build_config
    from megatrain.data.prepare import prepare_corpus

    path = tmp_path_factory.mktemp("corpus") / "stdlib"
    cfg = build_config({"data": {"path": str(path), "sources": ["stdlib"], "vocab_size": 512,
                                 "max_bytes": 300_000, "val_fraction": 0.05, "num_workers": 1}})
    prepare_corpus(cfg.data, seed=0)
    return str(path)


def tiny_overrides(corpus: str, log_dir, arch: str = "gpt2", **extra) -> list[str]:
    """Override list for launch/pretrain.py: a tiny model on the tiny corpus, fp32, no dropout, quiet."""
    tree = {f"model.{k}": v for k, v in TINY_MODELS[arch].items()}
    tree.update({"data.path": corpus, "data.seq_len": 32, "train.global_batch_size": 8, "train.micro_batch_size": 4,
                 "train.max_steps": 5, "train.lr": TINY_LR, "train.warmup_steps": 2, "train.eval_every": 0,
                 "train.eval_batches": 2, "log.dir": str(log_dir), "log.progress": "none", "log.tensorboard": False,
                 "log.report": False, "checkpoint.save_final": False, "train.seed": 7})
    tree.update(extra)
    import json
    return [f"--{k}={json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else v}" for k, v in tree.items()]


def assert_same_trained_weights(got: dict, ref: dict, *, lr: float) -> None:
    """Weights trained under two layouts from one seed are equal up to what Adam makes of fp32 reduction order.

    Adam moves every element by about lr·m/(√v + ε) per step whatever the gradient's size, so an element whose
    gradient is near zero (a sum of terms that nearly cancel) can take a visibly different step when the sum is
    reordered: one element of 16k was seen 2.2e-6 off at lr=1e-3 after 5 steps (0.2% of one step) on a CPU
    whose GEMM blocks differently. atol = 2% of one step keeps such elements in; a wrong shard, a missing
    all-reduce or a wrong gradient moves a whole tensor by ~lr a step, 50× more."""
    import torch
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=0.02 * lr, msg=k)


# What init_distributed exports for a plain one-process run (RANK=0, WORLD_SIZE=1, MASTER_PORT of the group it
# made). Left in the test process, every launcher a later test spawns would inherit it, believe it is rank 0 of a
# launched group and try to listen on that port again (EADDRINUSE). The group itself stays: it is reused.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")


@pytest.fixture(autouse=True)
def _launch_environment_stays_with_its_test():
    before = {k: os.environ.get(k) for k in _LAUNCH_VARS}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
