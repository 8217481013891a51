"""megatrain: a thin orchestration layer over DeepSpeed and PyTorch.

Importing the package picks DeepSpeed's accelerator before deepspeed itself is imported: without CUDA,
``DS_ACCELERATOR=cpu`` (gloo backend) so the same entry points run on a laptop, in CI and on a cluster.
"""
import os

__version__ = "0.1.0"


def _select_accelerator() -> None:
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


_select_accelerator()
