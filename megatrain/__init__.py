"""megatrain: a thin orchestration layer over DeepSpeed and PyTorch.

Importing it changes nothing in the process: the accelerator choice and the JIT toolchain are set where a process
starts training or builds an op (``megatrain.toolchain.prepare_process``).
"""
__version__ = "0.1.0"
