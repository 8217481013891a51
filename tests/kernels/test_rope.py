"""RoPE kernel vs the torch reference and fp64; in-place on views of a projection, as models use it."""
import pytest
import torch

from tests.kernels.conftest import DEVICE, check_against_reference

from megatrain.ops.rope import apply_rope_reference, rope_cache
from megatrain.triton_kernels.rope import rope

pytestmark = pytest.mark.usefixtures("poison_empty", "seed")


def _cos_sin(seq_len, head_dim):
    cos, sin = rope_cache(seq_len, head_dim, theta=500.0)
    return cos, sin


@pytest.mark.parametrize("b,hq,hkv,t,d", [(1, 1, 1, 1, 2), (2, 4, 2, 7, 16), (1, 3, 1, 13, 48)])
def test_rope_matches_reference(b, hq, hkv, t, d):
    q, k = torch.randn(b, hq, t, d).requires_grad_(), torch.randn(b, hkv, t, d).requires_grad_()
    cos, sin = _cos_sin(t, d)
    check_against_reference(rope, apply_rope_reference, [q, k, cos, sin])


def test_rope_per_batch_positions():
    # (B, T, D) tables: packed sequences restart positions per row.
    q, k = torch.randn(2, 2, 5, 8, device=DEVICE), torch.randn(2, 1, 5, 8, device=DEVICE)
    cos, sin = _cos_sin(9, 8)
    pos = torch.tensor([[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]])
    cos_b, sin_b = cos[pos].to(DEVICE), sin[pos].to(DEVICE)  # (B, T, D)
    q_out, k_out = rope(q, k, cos_b, sin_b)
    for i in range(2):
        q_ref, k_ref = apply_rope_reference(q[i:i + 1], k[i:i + 1], cos_b[i], sin_b[i])
        torch.testing.assert_close(q_out[i:i + 1], q_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(k_out[i:i + 1], k_ref, rtol=1e-6, atol=1e-6)


def test_rope_inplace_on_projection_views():
    b, t, hq, hkv, d = 2, 6, 4, 2, 16
    x = torch.randn(b, t, 32, device=DEVICE)
    proj = torch.nn.Linear(32, (hq + 2 * hkv) * d).to(DEVICE)
    cos, sin = (c.to(DEVICE) for c in _cos_sin(t, d))
    grads = {}
    outs = {}
    for name, inplace in (("ref", None), ("kernel", True)):
        proj.zero_grad()
        qkv = proj(x)
        q = qkv[..., : hq * d].view(b, t, hq, d).transpose(1, 2)  # (B, Hq, T, D), non-contiguous view
        k = qkv[..., hq * d: (hq + hkv) * d].view(b, t, hkv, d).transpose(1, 2)
        if inplace is None:
            q, k = apply_rope_reference(q, k, cos, sin)
        else:
            q, k = rope(q, k, cos, sin, inplace=True)
        loss = (q * torch.arange(d, device=DEVICE)).sum() + (k ** 2).sum()
        loss.backward()
        outs[name] = (q.detach().clone(), k.detach().clone())
        grads[name] = proj.weight.grad.clone()
    torch.testing.assert_close(outs["kernel"], outs["ref"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["kernel"], grads["ref"], rtol=1e-5, atol=1e-4)


def test_rope_rejects_bad_cos():
    q = torch.randn(1, 2, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="cos/sin"):
        rope(q, q, torch.ones(5, 8, device=DEVICE), torch.ones(5, 8, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_rope_gpu_lowprec(dtype, d):
    q, k = torch.randn(2, 32, 1025, d).requires_grad_(), torch.randn(2, 8, 1025, d).requires_grad_()
    cos, sin = _cos_sin(1025, d)
    check_against_reference(rope, apply_rope_reference, [q, k, cos, sin], dtype=dtype, atol_floor=1e-3)


def test_ops_wiring_reaches_kernel(monkeypatch):
    from tests.kernels.conftest import force_triton

    ops = force_triton(monkeypatch, "rope")
    q, k = torch.randn(1, 2, 6, 16, device=DEVICE), torch.randn(1, 1, 6, 16, device=DEVICE)
    cos, sin = (c.to(DEVICE) for c in _cos_sin(6, 16))
    expected = apply_rope_reference(q, k, cos, sin)
    torch.testing.assert_close(ops.apply_rope(q, k, cos, sin), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ops.apply_rope(q.clone(), k.clone(), cos, sin, inplace=True), expected,
                               rtol=1e-6, atol=1e-6)
