"""Multi-tensor AdamW kernel vs torch.optim.AdamW (fp32, several steps) and its bf16-master mode."""
import pytest
import torch

from tests.kernels.conftest import DEVICE

from megatrain.triton_kernels.adamw import adamw_step, adamw_step_reference

pytestmark = pytest.mark.usefixtures("poison_empty", "seed")

SHAPES = [(1,), (7,), (3, 5), (2049,), (0,)]  # 2049 spans two blocks; (0,) must be skipped cleanly
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _kernel_kwargs(step):
    return dict(step=step, lr=HYPER["lr"], beta1=HYPER["betas"][0], beta2=HYPER["betas"][1], eps=HYPER["eps"],
                weight_decay=HYPER["weight_decay"])


def _state(params):
    return [torch.zeros_like(p, dtype=torch.float32) for p in params], [torch.zeros_like(p, dtype=torch.float32) for p in params]


def test_adamw_matches_torch_optim_fp32_over_steps():
    params = [torch.randn(s, device=DEVICE) for s in SHAPES]
    ref = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(ref, foreach=False, **HYPER)
    m, v = _state(params)
    for step in range(1, 5):
        grads = [torch.randn(s, device=DEVICE) for s in SHAPES]
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
        adamw_step(params, grads, m, v, **_kernel_kwargs(step))
        for i, (p, r) in enumerate(zip(params, ref)):
            # torch's vectorised CPU lerp uses fused multiply-adds on the bulk and plain ones on the tail,
            # so even torch is not self-consistent to the bit: allow about one ulp.
            torch.testing.assert_close(p, r.detach(), rtol=1e-6, atol=1e-7, msg=f"param {i} at step {step}")
            torch.testing.assert_close(m[i], opt.state[r]["exp_avg"], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(v[i], opt.state[r]["exp_avg_sq"], rtol=1e-6, atol=1e-9)


def test_adamw_multi_tensor_equals_single_tensor_bitwise():
    params = [torch.randn(s, device=DEVICE) for s in SHAPES]
    single = [p.clone() for p in params]
    m, v = _state(params)
    m1, v1 = _state(params)
    for step in range(1, 3):
        grads = [torch.randn(s, device=DEVICE) for s in SHAPES]
        adamw_step(params, grads, m, v, **_kernel_kwargs(step))
        for i in range(len(SHAPES)):
            adamw_step([single[i]], [grads[i]], [m1[i]], [v1[i]], **_kernel_kwargs(step))
    for a, b in zip(params + m + v, single + m1 + v1):
        assert torch.equal(a, b)


def test_adamw_matches_reference_function():
    params = [torch.randn(s, device=DEVICE) for s in SHAPES]
    ref = [p.clone() for p in params]
    m, v = _state(params)
    rm, rv = _state(params)
    for step in range(1, 4):
        grads = [torch.randn(s, device=DEVICE) for s in SHAPES]
        adamw_step(params, grads, m, v, **_kernel_kwargs(step))
        adamw_step_reference(ref, grads, rm, rv, **_kernel_kwargs(step))
    for a, b in zip(params + m + v, ref + rm + rv):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adamw_bf16_params_with_fp32_master():
    master = [torch.randn(s, device=DEVICE) for s in SHAPES]
    params = [w.to(torch.bfloat16) for w in master]
    ref = [w.clone().requires_grad_() for w in master]
    opt = torch.optim.AdamW(ref, foreach=False, **HYPER)
    m, v = _state(master)
    for step in range(1, 4):
        grads = [torch.randn(s, device=DEVICE).to(torch.bfloat16) for s in SHAPES]
        for r, g in zip(ref, grads):
            r.grad = g.float()
        opt.step()
        adamw_step(params, grads, m, v, master_params=master, **_kernel_kwargs(step))
    for p, w, r in zip(params, master, ref):
        torch.testing.assert_close(w, r.detach(), rtol=1e-6, atol=1e-7)
        if DEVICE == "cuda":
            assert torch.equal(p, w.to(torch.bfloat16))  # round to nearest even, like torch
        else:
            # Triton's interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even): within one ulp.
            assert ((p.float() - w).abs() <= w.abs() * 2.0 ** -7).all()


@pytest.mark.parametrize("bad,match", [
    (dict(step=0), "step"),
    (dict(grads="short"), "grads"),
    (dict(params="bf16"), "master_params"),
])
def test_adamw_rejects_bad_input(bad, match):
    params = [torch.randn(4, device=DEVICE)]
    grads = [torch.randn(4, device=DEVICE)]
    if bad.get("grads") == "short":
        grads = []
    if bad.get("params") == "bf16":
        params = [params[0].to(torch.bfloat16)]
    m, v = _state(params)
    kwargs = _kernel_kwargs(bad.get("step", 1))
    with pytest.raises(ValueError, match=match):
        adamw_step(params, grads, m, v, **kwargs)


@pytest.mark.gpu
def test_adamw_gpu_many_tensors_fp32_and_bf16_master():
    shapes = [(4096, 4096), (11008,), (1,), (4097, 3)] * 4
    master = [torch.randn(s, device="cuda") for s in shapes]
    ref = [w.clone().requires_grad_() for w in master]
    params = [w.to(torch.bfloat16) for w in master]
    opt = torch.optim.AdamW(ref, foreach=False, **HYPER)
    m, v = _state(master)
    for step in range(1, 4):
        grads = [torch.randn(s, device="cuda") for s in shapes]
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
        adamw_step(params, grads, m, v, master_params=master, **_kernel_kwargs(step))
    for p, w, r in zip(params, master, ref):
        # GPU code may fuse multiply-adds: allow a few ulps rather than bit equality.
        torch.testing.assert_close(w, r.detach(), rtol=1e-6, atol=1e-8)
        assert torch.equal(p, w.to(torch.bfloat16))
