"""Flash attention (forward + backward, causal/full, GQA, ragged lengths) vs SDPA and fp64."""
import pytest
import torch

from tests.kernels.conftest import DEVICE, check_against_reference

from megatrain.ops.attention import attention_reference
from megatrain.triton_kernels.flash_attention import attention

pytestmark = pytest.mark.usefixtures("poison_empty", "seed")

# (B, Hq, Hkv, T, S, D, causal): interpreter-sized; block 16 so every case spans several ragged blocks
CPU_CASES = [
    (1, 2, 1, 1, 1, 16, True),
    (1, 2, 2, 37, 37, 32, True),
    (2, 4, 2, 33, 33, 16, False),
    (1, 2, 1, 23, 1, 16, True),     # one key (cf. (239, 1))
    (1, 1, 1, 19, 41, 48, True),    # T < S; D = 48 pads to a 64-wide tile
    (1, 3, 1, 41, 19, 64, False),   # T > S, GQA 3:1
]


def _qkv(b, hq, hkv, t, s, d):
    q = torch.randn(b, hq, t, d).requires_grad_()
    k = torch.randn(b, hkv, s, d).requires_grad_()
    v = torch.randn(b, hkv, s, d).requires_grad_()
    return q, k, v


@pytest.mark.parametrize("b,hq,hkv,t,s,d,causal", CPU_CASES)
def test_attention_matches_reference(b, hq, hkv, t, s, d, causal):
    q, k, v = _qkv(b, hq, hkv, t, s, d)
    check_against_reference(lambda q, k, v: attention(q, k, v, causal),
                            lambda q, k, v: attention_reference(q, k, v, causal), [q, k, v])


def test_attention_block_m_larger_than_block_n_causal():
    # BLOCK_M ≠ BLOCK_N changes which key blocks skip the mask.
    q, k, v = _qkv(1, 2, 1, 50, 50, 16)
    check_against_reference(lambda q, k, v: attention(q, k, v, True, block_m=32, block_n=16),
                            lambda q, k, v: attention_reference(q, k, v, True), [q, k, v])


def test_attention_strided_inputs():
    # (B, T, H, D) activations transposed to (B, H, T, D) views, as a fused QKV projection gives them.
    x = torch.randn(1, 21, 3, 3, 16, device=DEVICE)  # (B, T, {q,k,v}, H, D)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    torch.testing.assert_close(attention(q, k, v, True), attention_reference(q, k, v, True), rtol=1e-5, atol=1e-5)


def test_attention_rejects_bad_head_dim():
    q = torch.randn(1, 1, 4, 40, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of 16"):
        attention(q, q, q, True)


def test_ops_dispatch_falls_back_for_unsupported_head_dim(monkeypatch):
    # On a GPU the auto backend must not crash on D = 40: it falls back to the reference.
    import sys

    import megatrain.ops.attention  # noqa: F401

    ops_attention = sys.modules["megatrain.ops.attention"]  # the package re-exports a function of that name
    q = torch.randn(1, 2, 5, 40, device=DEVICE)
    monkeypatch.setattr(ops_attention, "backend_for", lambda op, device, **kw: "triton")
    with pytest.warns(UserWarning, match="head dim 40"):
        out = ops_attention.attention(q, q, q, causal=True)
    torch.testing.assert_close(out, attention_reference(q, q, q, True))


GPU_SEQ = [1, 97, 128, 200, 1023, 1025]
GPU_RAGGED = [(239, 1), (113, 203), (128, 217), (1025, 1023)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("ts", [(t, t) for t in GPU_SEQ] + GPU_RAGGED)
def test_attention_gpu_ratio_rule(dtype, d, causal, ts):
    t, s = ts
    q, k, v = _qkv(2, 8, 2, t, s, d)  # GQA 4:1
    check_against_reference(lambda q, k, v: attention(q, k, v, causal),
                            lambda q, k, v: attention_reference(q, k, v, causal), [q, k, v],
                            dtype=dtype, atol_floor=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [16, 32, 80, 96, 192, 256])
def test_attention_gpu_other_head_dims(d):
    q, k, v = _qkv(1, 4, 4, 257, 257, d)
    check_against_reference(lambda q, k, v: attention(q, k, v, True),
                            lambda q, k, v: attention_reference(q, k, v, True), [q, k, v],
                            dtype=torch.bfloat16, atol_floor=1e-4)


def test_ops_wiring_reaches_kernel(monkeypatch):
    from tests.kernels.conftest import force_triton

    ops = force_triton(monkeypatch, "attention")
    q, k, v = (torch.randn(1, 2, 9, 16, device=DEVICE) for _ in range(3))
    torch.testing.assert_close(ops.attention(q, k, v, causal=True), attention_reference(q, k, v, True),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_saved_lse_is_the_row_logsumexp(causal):
    from megatrain.triton_kernels.flash_attention import flash_attention_forward

    q, k, v = torch.randn(1, 2, 21, 32, device=DEVICE), torch.randn(1, 1, 35, 32, device=DEVICE), \
        torch.randn(1, 1, 35, 32, device=DEVICE)
    _, lse = flash_attention_forward(q, k, v, causal=causal)  # (B, Hq, T)
    scores = (q.double() @ k.double().transpose(-1, -2)) / 32 ** 0.5  # (B, Hq, T, S) via broadcast of 1 kv head
    if causal:
        scores = scores.masked_fill(torch.ones(21, 35, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)
