"""SwiGLU kernel vs the torch reference and fp64."""
import pytest
import torch

from tests.kernels.conftest import DEVICE, check_against_reference

from megatrain.ops.activations import swiglu_reference
from megatrain.triton_kernels.swiglu import swiglu

pytestmark = pytest.mark.usefixtures("poison_empty", "seed")


@pytest.mark.parametrize("shape", [(1,), (3, 7, 33), (2, 1025)])
def test_swiglu_matches_reference(shape):
    gate = (3 * torch.randn(shape)).requires_grad_()  # wide range: exercise both tails of the sigmoid
    up = torch.randn(shape).requires_grad_()
    check_against_reference(swiglu, swiglu_reference, [gate, up])


def test_swiglu_non_contiguous_inputs():
    # Models often split one (…, 2F) projection into gate/up views.
    both = torch.randn(5, 2 * 24, device=DEVICE)
    gate, up = both[:, :24], both[:, 24:]
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up), rtol=1e-6, atol=1e-6)


def test_swiglu_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(2, 3, device=DEVICE), torch.randn(2, 4, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swiglu_gpu_lowprec(dtype):
    gate, up = torch.randn(4, 512, 11008).requires_grad_(), torch.randn(4, 512, 11008).requires_grad_()
    check_against_reference(swiglu, swiglu_reference, [gate, up], dtype=dtype, atol_floor=1e-3)


def test_ops_wiring_reaches_kernel(monkeypatch):
    from tests.kernels.conftest import force_triton

    ops = force_triton(monkeypatch, "activations")
    gate, up = torch.randn(4, 33, device=DEVICE), torch.randn(4, 33, device=DEVICE)
    torch.testing.assert_close(ops.swiglu(gate, up), swiglu_reference(gate, up), rtol=1e-6, atol=1e-6)
