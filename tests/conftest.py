"""Shared test setup: CPU accelerator for DeepSpeed, GPU tests skipped without CUDA, tiny fixtures."""
import os
import sys

import pytest

import megatrain  # noqa: E402,F401  (sets DS_ACCELERATOR=cpu when CUDA is absent)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
