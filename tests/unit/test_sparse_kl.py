"""Top-k + tail-bucket KL: equals the dense KL at k = V, a float64 reference of the coarsened KL at k < V
(values and gradients), and the tp=1 result when the student's vocabulary is sharded over 2 ranks."""
import pytest
import torch

from megatrain.compress.kl import kl_per_token
from megatrain.compress.sparse_kl import sparse_kl, teacher_log_probs, topk_targets
from megatrain.testing import spawn_group


def _coarsened_kl_reference(s, t, ids, T):
    """KL between teacher and student, each reduced to the k tokens ``ids`` plus one bucket for all other tokens,
    from the full distributions in float64 (autograd gives the reference gradient)."""
    log_q = torch.log_softmax(s.double() / T, -1)  # (N, V)
    log_p = torch.log_softmax(t.double() / T, -1)
    others = torch.ones_like(log_q, dtype=torch.bool).scatter(1, ids, False)  # (N, V) tokens outside K
    lq_k, lp_k = log_q.gather(1, ids), log_p.gather(1, ids)  # (N, k)
    lq_r = log_q.masked_fill(~others, float("-inf")).logsumexp(-1)  # (N,) log tail masses, no cancellation
    lp_r = log_p.masked_fill(~others, float("-inf")).logsumexp(-1)
    return (lp_k.exp() * (lp_k - lq_k)).sum(-1) + lp_r.exp() * (lp_r - lq_r)


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_k_equal_vocab_is_the_dense_kl(T):
    torch.manual_seed(0)
    s, t = torch.randn(7, 17, requires_grad=True), torch.randn(7, 17) * 3
    ids, logp, tail = topk_targets(t, k=17, temperature=T)
    assert torch.isneginf(tail).all()  # nothing left outside the top-k
    kl = sparse_kl(s, ids, logp, tail, temperature=T, vocab_size=17)
    ref_s = s.detach().clone().requires_grad_(True)
    ref = kl_per_token(ref_s, t, temperature=T)
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)
    g = torch.rand(7)
    (kl * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(s.grad, ref_s.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_topk_matches_float64_reference_and_gradient(k):
    torch.manual_seed(k)
    T = 2.0
    s, t = torch.randn(6, 40, requires_grad=True), torch.randn(6, 40) * 4
    ids, logp, tail = topk_targets(t, k=k, temperature=T)
    kl = sparse_kl(s, ids, logp, tail, temperature=T, vocab_size=40)
    ref_s = s.detach().double().requires_grad_(True)
    ref = _coarsened_kl_reference(ref_s, t, ids, T)
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-6)
    g = torch.rand(6)
    (kl * g).sum().backward()
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=1e-5, atol=1e-7)
    # coarsening cannot increase a divergence: KL_K <= the full KL, and > 0 here
    assert (kl <= kl_per_token(s, t, temperature=T) + 1e-6).all() and (kl > 0).all()


def test_student_tail_far_below_its_max_stays_finite_and_exact():
    # The student puts its tail 200 nats below the top-k (fp32 exp underflows to 0 there) while the teacher
    # keeps real tail mass: the KL and its gradient must still match float64, not become inf or nan.
    torch.manual_seed(4)
    T = 1.0
    t = torch.randn(4, 30) * 2
    ids, logp, tail = topk_targets(t, k=5, temperature=T)
    s = torch.full((4, 30), -200.0).scatter(1, ids, torch.randn(4, 5))
    s[3] = torch.randn(30)  # an ordinary row beside them
    s.requires_grad_(True)
    kl = sparse_kl(s, ids, logp, tail, temperature=T, vocab_size=30)
    ref_s = s.detach().double().requires_grad_(True)
    ref = _coarsened_kl_reference(ref_s, t, ids, T)
    assert torch.isfinite(kl).all() and kl[:3].min() > 10  # the tail term dominates: r·(log r + ~200)
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-5)
    kl.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=1e-5, atol=1e-7)


def test_fp16_storage_is_renormalised():
    torch.manual_seed(3)
    s, t = torch.randn(5, 50), torch.randn(5, 50) * 5
    ids, logp, tail = topk_targets(t, k=8, temperature=1.0)
    full = teacher_log_probs(logp.half(), tail)  # as read back from an fp16 cache
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(5))
    exact = sparse_kl(s, ids, logp, tail, temperature=1.0, vocab_size=50)
    stored = sparse_kl(s, ids, logp.half(), tail, temperature=1.0, vocab_size=50)
    torch.testing.assert_close(stored, exact, rtol=2e-3, atol=2e-3)


def _tp_worker(rank, world, s_full, ids, logp, tail, vocab, T):
    per = s_full.shape[-1] // world  # padded vocabulary split evenly, as the tp LM head splits it
    s = s_full[:, rank * per:(rank + 1) * per].clone().requires_grad_(True)
    kl = sparse_kl(s, ids, logp, tail, temperature=T, vocab_size=vocab, group=torch.distributed.group.WORLD)
    ref_s = s_full[:, :vocab].clone().requires_grad_(True)
    ref = sparse_kl(ref_s, ids, logp, tail, temperature=T, vocab_size=vocab)
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)
    w = torch.arange(1, s.shape[0] + 1).float()
    (kl * w).sum().backward()
    (ref * w).sum().backward()
    padded = s_full.shape[-1]
    grad_ref = torch.cat([ref_s.grad, torch.zeros(s.shape[0], padded - vocab)], 1)[:, rank * per:(rank + 1) * per]
    torch.testing.assert_close(s.grad, grad_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.dist
def test_vocab_parallel_sparse_kl_equals_tp1():
    torch.manual_seed(5)
    vocab, padded, T = 13, 14, 2.0  # one padding column on the last rank
    s, t = torch.randn(6, padded), torch.randn(6, vocab) * 3
    s[:, vocab:] = 100.0  # padding must count neither in the partition function nor in the tail
    ids, logp, tail = topk_targets(t, k=5, temperature=T)
    s[0, :vocab] = torch.full((vocab,), -500.0).scatter(0, ids[0], 1.0)  # a row whose tail underflows
    assert (ids < 7).any() and (ids >= 7).any()  # selected tokens on both ranks
    spawn_group(2, _tp_worker, s, ids, logp, tail, vocab, T)
