"""LayerNorm kernel (plain and with fused residual add) vs the torch reference and fp64."""
import pytest
import torch

from tests.kernels.conftest import DEVICE, check_against_reference

from megatrain.ops.norms import layer_norm_reference
from megatrain.triton_kernels.layer_norm import add_layer_norm, layer_norm

pytestmark = pytest.mark.usefixtures("poison_empty", "seed")


def _add_ref(x, r, w, b, eps):
    h = x + r
    return layer_norm_reference(h, w, b, eps), h


@pytest.mark.parametrize("shape", [(1, 5), (3, 7, 33), (13, 192)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_matches_reference(shape, with_bias):
    h = shape[-1]
    x = torch.randn(shape).requires_grad_()
    w = (1 + 0.1 * torch.randn(h)).requires_grad_()
    b = (0.1 * torch.randn(h)).requires_grad_() if with_bias else None
    check_against_reference(layer_norm, layer_norm_reference, [x, w, b, 1e-5])


@pytest.mark.parametrize("shape", [(2, 9, 67), (17, 130)])
def test_add_layer_norm_matches_unfused(shape):
    h = shape[-1]
    x, r = torch.randn(shape).requires_grad_(), torch.randn(shape).requires_grad_()
    w, b = (1 + 0.1 * torch.randn(h)).requires_grad_(), (0.1 * torch.randn(h)).requires_grad_()
    check_against_reference(add_layer_norm, _add_ref, [x, r, w, b, 1e-5])


def test_layer_norm_rejects_bad_weight():
    with pytest.raises(ValueError, match="weight"):
        layer_norm(torch.randn(2, 8, device=DEVICE), torch.ones(7, device=DEVICE), None, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [192, 3000, 4096])
def test_layer_norm_gpu_lowprec(dtype, hidden):
    x = torch.randn(4, 257, hidden).requires_grad_()
    w, b = (1 + 0.1 * torch.randn(hidden)).requires_grad_(), (0.1 * torch.randn(hidden)).requires_grad_()
    check_against_reference(layer_norm, layer_norm_reference, [x, w, b, 1e-5], dtype=dtype, atol_floor=1e-3)
    r = torch.randn(4, 257, hidden).requires_grad_()
    check_against_reference(add_layer_norm, _add_ref, [x, r, w, b, 1e-5], dtype=dtype, atol_floor=1e-3)


def test_ops_wiring_reaches_kernel(monkeypatch):
    from tests.kernels.conftest import force_triton

    ops = force_triton(monkeypatch, "norms")
    x, r = torch.randn(3, 40, device=DEVICE), torch.randn(3, 40, device=DEVICE)
    w, b = torch.randn(40, device=DEVICE), torch.randn(40, device=DEVICE)
    torch.testing.assert_close(ops.layer_norm(x, w, b, 1e-5), layer_norm_reference(x, w, b, 1e-5), rtol=1e-5, atol=1e-5)
    y, h = ops.add_layer_norm(x, r, w, b, 1e-5)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, layer_norm_reference(x + r, w, b, 1e-5), rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    y_torch, h_torch = ops.add_layer_norm(x, r, w, b, 1e-5)  # the CPU path
    torch.testing.assert_close((y_torch, h_torch), (y, h), rtol=1e-5, atol=1e-5)
