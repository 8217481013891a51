"""CUDA LayerNorm/RMSNorm (csrc/layer_norm) vs fp64 references, KERNELS.md rules. GPU only."""
import pytest
import torch
import torch.nn.functional as F

from megatrain.ops import dispatch, extensions
from megatrain.ops.norms import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference

pytestmark = pytest.mark.gpu
ROWS = (1, 97, 1025)
HIDDEN = (97, 192, 1023, 3000, 4096, 8192)  # warp path (<= 1024, vectorisable), block path, unvectorisable
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


@pytest.fixture(scope="module", autouse=True)
def cuda_norms():
    assert extensions.load("layer_norm"), extensions._status("layer_norm").detail
    saved = dispatch.current_config()
    default, overrides = saved.default, dict(saved.overrides)
    dispatch.configure("auto", {"layer_norm": "cuda", "rms_norm": "cuda"})
    yield
    dispatch.configure(default, overrides)


def _poison_allocator():
    # the kernel's outputs come from torch's caching allocator: hand it NaN-filled blocks first
    junk = torch.full((64 << 20,), float("nan"), device="cuda")
    del junk


def _grads(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(dy.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves if t is not None]


def _check(name, got, ref64, lowp):
    for what, g, r, lp in zip(("out", "dx", "dweight", "dbias"), got, ref64, lowp):
        assert not torch.isnan(g).any(), f"{name} {what}: NaN"
        err = (g.double() - r).abs().max().item()
        err_lp = (lp.double() - r).abs().max().item()
        floor = FLOOR[g.dtype] * max(1.0, r.abs().max().item())
        assert err <= 2 * err_lp + floor, f"{name} {what}: kernel {err:.3e} vs torch {err_lp:.3e} (+{floor:.1e})"
        rel = ((g.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
        assert rel < (1e-4 if g.dtype == torch.float32 else 2e-2), f"{name} {what}: relative error {rel:.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("kind", ["layer_norm", "layer_norm_nobias", "rms_norm"])
def test_norm_matches_fp64_reference(kind, rows, hidden, dtype):
    torch.manual_seed(rows * 7919 + hidden)
    x = (torch.randn(rows, hidden, device="cuda") * 3 + 1.5).to(dtype)  # non-zero mean: tests the shifted sums
    w = (torch.randn(hidden, device="cuda") * 0.5 + 1).to(dtype)
    b = (torch.randn(hidden, device="cuda") * 0.1).to(dtype) if kind == "layer_norm" else None
    dy = torch.randn(rows, hidden, device="cuda")
    _poison_allocator()
    if kind == "rms_norm":
        ours = _grads(lambda x_, w_: rms_norm(x_, w_, 1e-6), [x, w], dy)
        ref = _grads(lambda x_, w_: rms_norm_reference(x_, w_, 1e-6), [x.double(), w.double()], dy)
        low = _grads(lambda x_, w_: F.rms_norm(x_, (hidden,), w_, 1e-6), [x, w], dy)
    else:
        inputs = [x, w, b]
        ours = _grads(lambda x_, w_, b_=None: layer_norm(x_, w_, b_, 1e-5), inputs, dy)
        ref = _grads(lambda x_, w_, b_=None: layer_norm_reference(x_, w_, b_, 1e-5),
                     [t.double() if t is not None else None for t in inputs], dy)
        low = _grads(lambda x_, w_, b_=None: F.layer_norm(x_, (hidden,), w_, b_, 1e-5), inputs, dy)
    _check(f"{kind} {rows}x{hidden} {dtype}", ours, ref, low)


def test_fp32_weights_with_bf16_activations():
    x = torch.randn(33, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(4096, device="cuda", requires_grad=True)  # fp32 param, bf16 activations (autocast style)
    y = rms_norm(x, w, 1e-6)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and w.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_backward_is_deterministic():
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grads = []
    for _ in range(2):
        x.grad = w.grad = None
        layer_norm(x, w, None, 1e-5).backward(torch.ones_like(x))
        grads.append((x.grad.clone(), w.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
