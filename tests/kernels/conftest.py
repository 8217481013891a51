"""Kernel tests: Triton's interpreter on CPU (fp32 only), NaN-poisoned buffers, the fp64 ratio rule.

A test module opts into the fixtures with ``pytestmark = pytest.mark.usefixtures("poison_empty", "seed")``
(not autouse: other suites share this folder).

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` runs (the decorator reads it), so it is set
here, before a test module imports a kernel.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poison_empty(monkeypatch):
    """Every float buffer the kernels allocate with torch.empty/empty_like starts as NaN, so an element
    a kernel forgets to write fails the test instead of passing on leftover memory."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(real_empty_like(*a, **k)))
    yield


@pytest.fixture
def seed():
    torch.manual_seed(1234)
    yield


def assert_ratio(name, out, low, ref64, *, atol_floor=1e-5):
    """KERNELS.md rule: max|out − ref64| ≤ 2·max|low − ref64| + atol_floor (scaled by |ref64|); no NaN."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    out64, low64 = out.detach().double().cpu(), low.detach().double().cpu()
    ref64 = ref64.detach().double().cpu()
    assert not torch.isnan(out64).any(), f"{name}: NaN in kernel output"
    floor = atol_floor * max(1.0, ref64.abs().max().item()) if ref64.numel() else atol_floor
    err = (out64 - ref64).abs().max().item() if ref64.numel() else 0.0
    bound = 2 * ((low64 - ref64).abs().max().item() if ref64.numel() else 0.0) + floor
    rel = ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item() if ref64.numel() else 0.0
    assert err <= bound, f"{name}: max err {err:.3e} > bound {bound:.3e} (rel {rel:.2e})"
    return rel


def _cast(args, dtype, device):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            out.append(a.detach().to(device=device, dtype=dtype).requires_grad_(a.requires_grad))
        elif isinstance(a, torch.Tensor):
            out.append(a.to(device))
        else:
            out.append(a)
    return out


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def check_against_reference(kernel_fn, ref_fn, args, *, atol_floor=1e-5, dtype=torch.float32, backward=True,
                            low_fn=None):
    """Run kernel_fn (at ``dtype`` on DEVICE), ref_fn at ``dtype`` (the low-precision baseline, on DEVICE)
    and ref_fn in fp64 on CPU; compare outputs and, with a random upstream grad, every input gradient."""
    low_fn = low_fn or ref_fn
    k_args = _cast(args, dtype, DEVICE)
    l_args = _cast(args, dtype, DEVICE)
    r_args = _cast(args, torch.float64, "cpu")
    k_out, l_out, r_out = _as_tuple(kernel_fn(*k_args)), _as_tuple(low_fn(*l_args)), _as_tuple(ref_fn(*r_args))
    for i, (k, low, r) in enumerate(zip(k_out, l_out, r_out)):
        assert k.dtype == low.dtype, f"output {i}: dtype {k.dtype} != reference's {low.dtype}"
        assert_ratio(f"output {i}", k, low, r, atol_floor=atol_floor)
    if not backward:
        return
    grads = [torch.randn(r.shape, dtype=torch.float64) for r in r_out]
    for outs, xs in ((k_out, k_args), (l_out, l_args), (r_out, r_args)):
        torch.autograd.backward([o for o in outs], [g.to(device=o.device, dtype=o.dtype) for o, g in zip(outs, grads)])
    for i, (k, low, r) in enumerate(zip(k_args, l_args, r_args)):
        if isinstance(r, torch.Tensor) and r.requires_grad:
            assert k.grad is not None, f"input {i}: no gradient from the kernel"
            assert_ratio(f"grad of input {i}", k.grad, low.grad, r.grad, atol_floor=atol_floor)


def force_triton(monkeypatch, module_name):
    """Make the dispatcher in ``megatrain.ops.<module_name>`` choose the triton backend even on CPU
    (interpreter), to check the wiring from the ops layer to the kernels."""
    import importlib
    import sys

    importlib.import_module(f"megatrain.ops.{module_name}")
    module = sys.modules[f"megatrain.ops.{module_name}"]  # the package re-exports same-named functions
    monkeypatch.setattr(module, "backend_for", lambda op, device="cpu", **kw: "triton")
    return module
