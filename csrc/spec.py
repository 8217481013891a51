"""What each C++/CUDA extension is built from: read by csrc/build.py (setup.py) and by
megatrain/ops/extensions.py (JIT build), so both paths compile the same sources with the same flags.

Kept free of imports beyond the standard library: extensions.py loads it by file path.
"""
from __future__ import annotations

# -ffp-contract=off: the scalar and vector CPU AdamW paths must round identically (bit-equal tests);
# -fopenmp links libgomp.so.1, the same soname torch loads, so there is one OpenMP pool per process.
# No -std flag: torch adds the standard its headers need (C++20 for torch 2.13).
CPU_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
CPU_LDFLAGS = ["-fopenmp"]
# No --use_fast_math: AdamW's sqrt/div and the norms' rsqrt are compared against fp64 references.
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
HOST_FLAGS_FOR_CUDA = ["-O3"]
# setup.py builds for these when TORCH_CUDA_ARCH_LIST is unset (A100 and H100).
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0a"

EXTENSIONS: dict[str, dict] = {
    # name: kind, sources (relative to csrc/), torch.ops namespace the library registers
    "cpu_adam": {
        "kind": "cpu",
        "sources": ["cpu_adam/cpu_adam.cpp", "cpu_adam/bind.cpp"],
        "headers": ["cpu_adam/cpu_adam.h"],
        "namespace": "megatrain_cpu_adam",
    },
    "fused_adam": {
        "kind": "cuda",
        "sources": ["fused_adam/fused_adam.cu", "fused_adam/bind.cpp"],
        "headers": ["fused_adam/fused_adam.h", "common/dtype.h", "common/cuda_utils.cuh"],
        "namespace": "megatrain_fused_adam",
    },
    "layer_norm": {
        "kind": "cuda",
        "sources": ["layer_norm/layer_norm.cu", "layer_norm/bind.cpp"],
        "headers": ["layer_norm/layer_norm.h", "common/dtype.h", "common/cuda_utils.cuh"],
        "namespace": "megatrain_layer_norm",
    },
}


def module_name(name: str) -> str:
    """Import name of the library when setup.py built it (found with importlib, loaded by torch.ops)."""
    return f"megatrain._ext_{name}"
