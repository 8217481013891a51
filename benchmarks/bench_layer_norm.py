"""LayerNorm (and fused residual add + LayerNorm): Triton vs torch eager, torch.compile and Liger."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main(argv=None):
    args = common.setup("bench_layer_norm", __doc__, argv)
    from bench_rms_norm import norm_cases

    from megatrain.ops.norms import layer_norm_reference
    from megatrain.triton_kernels.layer_norm import add_layer_norm, layer_norm

    eps = 1e-5

    def liger(h, w, b):
        from liger_kernel.transformers import LigerLayerNorm

        return LigerLayerNorm(h, eps=eps).to(device=w.device, dtype=w.dtype)

    def reference_add(x, r, w, b):
        h = x + r
        return layer_norm_reference(h, w, b, eps), h

    cases = norm_cases(args, kernel=lambda x, w, b: layer_norm(x, w, b, eps),
                       reference=lambda x, w, b: layer_norm_reference(x, w, b, eps),
                       kernel_add=lambda x, r, w, b: add_layer_norm(x, r, w, b, eps), reference_add=reference_add,
                       liger_factory=liger, has_bias=True, op="layer_norm")
    common.run(args, cases)


if __name__ == "__main__":
    main()
