"""torch's fused F.layer_norm / F.rms_norm forms of the norms vs the plain-torch references and fp64."""
import pytest
import torch

from tests.kernels.conftest import check_against_reference

from megatrain.ops import norms

pytestmark = pytest.mark.usefixtures("seed")


@pytest.mark.parametrize("shape", [(1, 3), (5, 11, 48), (7, 192), (2, 97, 3000)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_fused_matches_reference(shape, with_bias):
    x = (3 + 2 * torch.randn(shape)).requires_grad_()  # an offset mean: a one-pass variance would lose bits
    w = (1 + 0.1 * torch.randn(shape[-1])).requires_grad_()
    b = torch.randn(shape[-1]).requires_grad_() if with_bias else None
    check_against_reference(norms.layer_norm_fused, norms.layer_norm_reference, [x, w, b, 1e-5])


@pytest.mark.parametrize("shape", [(1, 3), (5, 11, 48), (7, 192), (2, 97, 3000)])
def test_rms_norm_fused_matches_reference(shape):
    x = torch.randn(shape).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1])).requires_grad_()
    check_against_reference(norms.rms_norm_fused, norms.rms_norm_reference, [x, w, 1e-6])


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_keep_fp32_statistics_and_reference_dtypes(w_dtype):
    # bf16 activations with fp32 (mixed precision) or bf16 weights: same output dtype as the reference,
    # and values within one bf16 rounding of it (the statistics are fp32 on both sides).
    x = (2 + torch.randn(4, 33, 200)).bfloat16()
    w, b = (1 + 0.1 * torch.randn(200)).to(w_dtype), torch.randn(200).to(w_dtype)
    for fused, ref in ((norms.layer_norm_fused(x, w, b, 1e-5), norms.layer_norm_reference(x, w, b, 1e-5)),
                       (norms.rms_norm_fused(x, w, 1e-6), norms.rms_norm_reference(x, w, 1e-6))):
        assert fused.dtype == ref.dtype
        torch.testing.assert_close(fused.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_cpu_dispatch_uses_the_fused_layer_norm(monkeypatch):
    # ops.layer_norm (and add_layer_norm) on CPU must reach torch's fused primitive, not the composite
    calls = []
    real_ln = torch.nn.functional.layer_norm
    monkeypatch.setattr(norms.F, "layer_norm", lambda *a, **k: calls.append("ln") or real_ln(*a, **k))
    x, w, b = torch.randn(3, 16), torch.randn(16), torch.randn(16)
    torch.testing.assert_close(norms.layer_norm(x, w, b, 1e-5), norms.layer_norm_reference(x, w, b, 1e-5))
    y, h = norms.add_layer_norm(x, x, w, b, 1e-5)
    torch.testing.assert_close(y, norms.layer_norm_reference(x + x, w, b, 1e-5))
    assert calls == ["ln", "ln"]
