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


# ---- per-document masks (packed rows, varlen): segments per query and key row ------------------------------------

def _packed_segments(b, t, lengths_per_row):
    """(B, T) int64 document ids from each row's document lengths (the rest of the row is one more document)."""
    rows = []
    for lengths in lengths_per_row[:b]:
        ids = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lengths)])
        rows.append(torch.cat([ids, torch.full((t - ids.numel(),), len(lengths), dtype=torch.long)]))
    return torch.stack(rows).to(DEVICE)


# (B, Hq, Hkv, T, D, causal, document lengths per row); block 16: documents start mid-block, span several blocks,
# and whole key blocks hold none of a query block's documents (skipped)
SEGMENT_CASES = [
    (2, 2, 1, 37, 16, True, [[10, 20], [3]]),
    (1, 2, 2, 50, 32, True, [[1, 1, 1, 30]]),            # one-token documents
    (2, 4, 2, 41, 16, False, [[7, 16, 1], [40]]),        # full attention inside each document, GQA 2:1
    (1, 3, 1, 70, 64, True, [[16, 16, 16, 5]]),          # documents on block edges, GQA 3:1
    (1, 1, 1, 23, 48, False, [[23]]),                    # one document: the unmasked result
]


@pytest.mark.parametrize("b,hq,hkv,t,d,causal,lengths", SEGMENT_CASES)
def test_attention_segments_match_reference(b, hq, hkv, t, d, causal, lengths):
    q, k, v = _qkv(b, hq, hkv, t, t, d)
    seg = _packed_segments(b, t, lengths)
    check_against_reference(lambda q, k, v: attention(q, k, v, causal, segments=seg),
                            lambda q, k, v: attention_reference(q, k, v, causal, segments=seg.to(q.device)),
                            [q, k, v])


def test_attention_segments_block_m_ne_block_n_and_unsorted_ids():
    # ids need not be sorted or contiguous: equal ids attend to each other wherever they sit
    q, k, v = _qkv(1, 2, 1, 45, 45, 16)
    seg = torch.randint(0, 3, (1, 45), device=DEVICE)
    for bm, bn in ((32, 16), (16, 32)):
        check_against_reference(lambda q, k, v: attention(q, k, v, True, segments=seg, block_m=bm, block_n=bn),
                                lambda q, k, v: attention_reference(q, k, v, True, segments=seg.to(q.device)),
                                [q, k, v])


def test_attention_key_segments_of_their_own():
    # queries and keys with their own ids (T ≠ S), every row sees at least one key: as the reference
    q, k, v = _qkv(1, 2, 1, 19, 33, 16)
    seg_q = torch.tensor([[0] * 9 + [1] * 10], device=DEVICE)
    seg_k = torch.tensor([[0] * 4 + [1] * 29], device=DEVICE)
    check_against_reference(
        lambda q, k, v: attention(q, k, v, False, segments=seg_q, key_segments=seg_k),
        lambda q, k, v: attention_reference(q, k, v, False, segments=seg_q.to(q.device), key_segments=seg_k.to(q.device)),
        [q, k, v])


def test_attention_row_without_keys_is_zero_with_zero_grads():
    # a query whose document has no key: output 0, LSE +inf, no gradient through it and no NaN anywhere
    from megatrain.triton_kernels.flash_attention import flash_attention_forward

    q, k, v = _qkv(1, 1, 1, 8, 8, 16)
    seg_q = torch.tensor([[0, 0, 0, 0, 2, 2, 2, 2]], device=DEVICE)
    seg_k = torch.zeros(1, 8, dtype=torch.long, device=DEVICE)
    out = attention(q, k, v, False, segments=seg_q, key_segments=seg_k)
    assert torch.equal(out[0, 0, 4:], torch.zeros(4, 16))
    _, lse = flash_attention_forward(q.detach(), k.detach(), v.detach(), causal=False, segments=seg_q,
                                     key_segments=seg_k)
    assert torch.isinf(lse[0, 0, 4:]).all() and torch.isfinite(lse[0, 0, :4]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[0, 0, 4:], torch.zeros(4, 16))
    ref = attention_reference(q.detach()[:, :, :4], k.detach(), v.detach(), False)  # the rows that have keys
    torch.testing.assert_close(out[:, :, :4].detach(), ref, rtol=1e-5, atol=1e-5)


def test_attention_segments_bad_shape():
    q = torch.randn(1, 1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="segments must be integer document ids shaped"):
        attention(q, q, q, True, segments=torch.zeros(1, 5, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="need T = S"):
        attention(q, torch.randn(1, 1, 6, 16), torch.randn(1, 1, 6, 16), True,
                  segments=torch.zeros(1, 4, dtype=torch.long, device=DEVICE))


def test_ops_wiring_sends_segments_to_kernel(monkeypatch):
    from tests.kernels.conftest import force_triton
    import megatrain.triton_kernels.flash_attention as fa

    ops = force_triton(monkeypatch, "attention")
    calls = []
    real = fa.attention
    monkeypatch.setattr(fa, "attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    q, k, v = (torch.randn(1, 2, 20, 16, device=DEVICE) for _ in range(3))
    seg = _packed_segments(1, 20, [[6, 9]])
    out = ops.attention(q, k, v, causal=True, segments=seg)
    assert calls and calls[0]["segments"] is seg  # the kernel ran, not the reference
    torch.testing.assert_close(out, attention_reference(q, k, v, True, segments=seg), rtol=1e-5, atol=1e-5)
    # a q_offset (KV cache) or a window still runs the reference
    calls.clear()
    ops.attention(q, k, v, causal=True, segments=seg, window=4)
    ops.attention(q[:, :, -1:], k, v, causal=True, segments=seg[:, -1:], key_segments=seg, q_offset=19)
    assert not calls


def test_packed_model_on_the_kernel_equals_documents_alone(monkeypatch):
    # the whole path: a llama forward + backward over a packed row with the kernel as its attention equals the
    # torch reference's, and each document's logits equal those of the document run alone
    from tests.kernels.conftest import force_triton
    from megatrain.config.schema import ModelConfig
    from megatrain.models.transformer import build_transformer

    m = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=64,
                    max_seq_len=64, head_dim=16)
    model = build_transformer(m, seed=3).to(DEVICE)
    ids = torch.randint(0, 64, (1, 30), device=DEVICE)
    seg = _packed_segments(1, 30, [[12, 11]])
    pos = torch.cat([torch.arange(12), torch.arange(11), torch.arange(7)]).to(DEVICE)[None]
    ref = model(ids, positions=pos, segments=seg)
    force_triton(monkeypatch, "attention")
    got = model(ids, positions=pos, segments=seg)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    alone = model(ids[:, 12:23])
    torch.testing.assert_close(got[:, 12:23], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("t,lengths", [(1025, [[100, 300, 1, 500]]), (2048, [[1000, 24, 511]])])
def test_attention_segments_gpu_ratio_rule(dtype, d, t, lengths):
    q, k, v = _qkv(2, 8, 2, t, t, d)
    seg = _packed_segments(2, t, lengths * 2)
    check_against_reference(lambda q, k, v: attention(q, k, v, True, segments=seg),
                            lambda q, k, v: attention_reference(q, k, v, True, segments=seg.to(q.device)), [q, k, v],
                            dtype=dtype, atol_floor=1e-4)


def test_left_padded_prefill_on_the_kernel_equals_the_reference(monkeypatch):
    # a KV-cache prefill (q_offset 0, key segments from the cache) runs the kernel; the decode step after it
    # (q_offset > 0) runs the reference; both as the all-reference run
    from tests.kernels.conftest import force_triton
    from megatrain.config.schema import ModelConfig
    from megatrain.models.kv_cache import KVCache
    from megatrain.models.transformer import build_transformer

    m = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=64,
                    max_seq_len=32, head_dim=16)
    model = build_transformer(m, seed=5).to(DEVICE)
    ids = torch.randint(1, 64, (2, 9), device=DEVICE)
    segments = torch.tensor([[1] * 9, [0] * 4 + [1] * 5], device=DEVICE)
    positions = (segments.cumsum(1) - 1).clamp_min(0)

    def run():
        with torch.no_grad():
            cache = KVCache(len(model.layers), max_len=12)
            out = model(ids, positions=positions, segments=segments, cache=cache)
            step = model(ids[:, :1], positions=positions[:, -1:] + 1, segments=torch.ones_like(ids[:, :1]),
                         cache=cache)
        return out, step
    ref = run()
    import megatrain.triton_kernels.flash_attention as fa
    force_triton(monkeypatch, "attention")
    calls = []
    real = fa.attention
    monkeypatch.setattr(fa, "attention", lambda *a, **kw: calls.append(a[0].shape[2]) or real(*a, **kw))
    got = run()
    assert calls == [9, 9]  # the prefill of both layers ran the kernel, the decode step did not
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
