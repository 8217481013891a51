"""Multi-tensor AdamW step: Triton vs torch.optim.AdamW (foreach and fused). Bound: 28 bytes/parameter
(fp32: read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq)."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

HYPER = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def layer_shapes(total: int, hidden: int):
    """Llama-like tensor list of about ``total`` parameters: per layer 4 attention + 3 MLP matrices + 2 norms."""
    ffn = int(hidden * 8 / 3) // 256 * 256
    layer = [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn), (hidden,), (hidden,)]
    per_layer = sum(torch.Size(s).numel() for s in layer)
    return layer * max(1, total // per_layer)


def _case(args, shapes, label, adamw_step):
    params = [torch.randn(s, device=args.device) for s in shapes]
    grads = [torch.randn_like(p) for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    n_params = sum(p.numel() for p in params)
    step = [0]

    def triton_step():
        step[0] += 1
        adamw_step(params, grads, m, v, step=step[0], lr=HYPER["lr"], beta1=HYPER["betas"][0],
                   beta2=HYPER["betas"][1], eps=HYPER["eps"], weight_decay=HYPER["weight_decay"])

    fns = {"triton": triton_step}
    for name, kwargs in (("torch", dict(foreach=True)), ("torch-fused", dict(fused=True))):
        if name == "torch-fused" and args.device != "cuda":
            continue
        ref = [p.clone().requires_grad_() for p in params]
        for r, g in zip(ref, grads):
            r.grad = g
        opt = torch.optim.AdamW(ref, **HYPER, **kwargs)
        fns[name] = opt.step
    return common.Case(f"{label} ({n_params / 1e6:.0f}M params, {len(shapes)} tensors)", "step", fns,
                       bytes_moved=28 * n_params)


def main(argv=None):
    args = common.setup("bench_adamw_triton", __doc__, argv)
    from megatrain.triton_kernels.adamw import adamw_step

    if args.smoke:
        cases = [_case(args, [(3, 5), (2049,), (7,)], "smoke", adamw_step)]
    else:
        sizes = [(1_000_000_000, 4096, "1B fp32")] if not args.quick else [(250_000_000, 2048, "250M fp32")]
        cases = [_case(args, layer_shapes(total, hidden), label, adamw_step) for total, hidden, label in sizes]
    common.run(args, cases)


if __name__ == "__main__":
    main()
