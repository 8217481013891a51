"""RMSNorm kernel (plain and with fused residual add) vs the torch reference and fp64."""
import pytest
import torch

from tests.kernels.conftest import check_against_reference

from megatrain.ops.norms import rms_norm_reference
from megatrain.triton_kernels.rms_norm import add_rms_norm, rms_norm

pytestmark = pytest.mark.usefixtures("poison_empty", "seed")


def _add_ref(x, r, w, eps):
    h = x + r
    return rms_norm_reference(h, w, eps), h


@pytest.mark.parametrize("shape", [(1, 3), (5, 11, 48), (7, 192)])
def test_rms_norm_matches_reference(shape):
    x = torch.randn(shape).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1])).requires_grad_()
    check_against_reference(rms_norm, rms_norm_reference, [x, w, 1e-6])


@pytest.mark.parametrize("shape", [(3, 5, 37), (29, 64)])
def test_add_rms_norm_matches_unfused(shape):
    x, r = torch.randn(shape).requires_grad_(), torch.randn(shape).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1])).requires_grad_()
    check_against_reference(add_rms_norm, _add_ref, [x, r, w, 1e-6])


def test_add_rms_norm_dispatch_matches_on_cpu():
    # The ops-level entry point on CPU tensors runs the torch composition; it must agree with the kernel.
    from megatrain.ops.norms import add_rms_norm as op_add_rms_norm

    x, r, w = torch.randn(4, 24), torch.randn(4, 24), torch.randn(24)
    y_op, h_op = op_add_rms_norm(x, r, w, 1e-6)
    y_k, h_k = add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(h_op, h_k)
    torch.testing.assert_close(y_op, y_k, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [192, 3000, 4096])
def test_rms_norm_gpu_lowprec(dtype, hidden):
    x = torch.randn(4, 257, hidden).requires_grad_()
    w = (1 + 0.1 * torch.randn(hidden)).requires_grad_()
    check_against_reference(rms_norm, rms_norm_reference, [x, w, 1e-6], dtype=dtype, atol_floor=1e-3)
    r = torch.randn(4, 257, hidden).requires_grad_()
    check_against_reference(add_rms_norm, _add_ref, [x, r, w, 1e-6], dtype=dtype, atol_floor=1e-3)


def test_ops_wiring_reaches_kernel(monkeypatch):
    from tests.kernels.conftest import DEVICE, force_triton

    ops = force_triton(monkeypatch, "norms")
    x, r, w = torch.randn(3, 40, device=DEVICE), torch.randn(3, 40, device=DEVICE), torch.randn(40, device=DEVICE)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), rtol=1e-5, atol=1e-5)
    y, h = ops.add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(y, rms_norm_reference(x + r, w, 1e-6), rtol=1e-5, atol=1e-5)
