"""Cross-entropy kernels vs the torch reference and fp64: plain, fused linear+CE, vocab-parallel."""
import pytest
import torch

from tests.kernels.conftest import DEVICE, check_against_reference

from megatrain.ops.cross_entropy import cross_entropy_reference
from megatrain.triton_kernels.cross_entropy import cross_entropy

pytestmark = pytest.mark.usefixtures("poison_empty", "seed")


def _labels(n, v, *, ignore_index=-100, frac_ignored=0.2):
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < frac_ignored] = ignore_index
    return labels


@pytest.mark.parametrize("n,v", [(1, 7), (13, 97), (6, 200)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_reference(n, v, reduction, smoothing):
    logits = (3 * torch.randn(n, v)).requires_grad_()
    labels = _labels(n, v)
    labels[0] = v - 1  # the last column sits in the masked tail of the last block

    def kernel(x, y):
        return cross_entropy(x, y, label_smoothing=smoothing, reduction=reduction)

    def ref(x, y):
        return cross_entropy_reference(x, y, label_smoothing=smoothing, reduction=reduction)

    check_against_reference(kernel, ref, [logits, labels])


def test_cross_entropy_custom_ignore_index_and_reuse_logits():
    logits = torch.randn(9, 50, device=DEVICE)
    labels = _labels(9, 50, ignore_index=3, frac_ignored=0.4).to(DEVICE)
    x_ref = logits.clone().requires_grad_()
    loss_ref = cross_entropy_reference(x_ref, labels, ignore_index=3)
    loss_ref.backward()
    x = logits.clone().requires_grad_()
    buf = x.detach()  # the kernel writes the gradient over this storage
    loss = cross_entropy(x * 1.0, labels, ignore_index=3, reuse_logits=True)  # x*1.0: a non-leaf to overwrite
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(buf, logits)  # the leaf itself was never touched


def test_cross_entropy_all_ignored_is_nan_like_torch():
    logits = torch.randn(3, 11, device=DEVICE, requires_grad=True)
    labels = torch.full((3,), -100, device=DEVICE)
    loss = cross_entropy(logits, labels)
    assert torch.isnan(loss) and torch.isnan(cross_entropy_reference(logits, labels))
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_cross_entropy_rejects_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(torch.randn(2, 5, device=DEVICE), torch.zeros(2, dtype=torch.long, device=DEVICE),
                      reduction="avg")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("v", [50257, 128256])
def test_cross_entropy_gpu(dtype, v):
    logits = torch.randn(1025, v).requires_grad_()
    labels = _labels(1025, v)
    check_against_reference(lambda x, y: cross_entropy(x, y, label_smoothing=0.1),
                            lambda x, y: cross_entropy_reference(x, y, label_smoothing=0.1),
                            [logits, labels], dtype=dtype, atol_floor=1e-4)


# ---- fused linear + cross-entropy -------------------------------------------------------------------

from megatrain.triton_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy  # noqa: E402


def _linear_ce_ref(h, w, y, b, smoothing, reduction):
    logits = h @ w.t()
    if b is not None:
        logits = logits + b
    return cross_entropy_reference(logits, y, label_smoothing=smoothing, reduction=reduction)


@pytest.mark.parametrize("n,hid,v,chunk,with_bias", [(1, 16, 9, None, True), (37, 24, 101, 8, False),
                                                     (20, 8, 64, None, True)])
@pytest.mark.parametrize("reduction,smoothing", [("mean", 0.0), ("sum", 0.1)])
def test_fused_linear_cross_entropy_matches_reference(n, hid, v, chunk, with_bias, reduction, smoothing):
    h = torch.randn(n, hid).requires_grad_()
    w = (torch.randn(v, hid) / hid ** 0.5).requires_grad_()
    b = (0.1 * torch.randn(v)).requires_grad_() if with_bias else None
    y = _labels(n, v)

    def kernel(h, w, y, b):
        return fused_linear_cross_entropy(h, w, y, bias=b, label_smoothing=smoothing, reduction=reduction,
                                          chunk_size=chunk)

    def ref(h, w, y, b):
        return _linear_ce_ref(h, w, y, b, smoothing, reduction)

    check_against_reference(kernel, ref, [h, w, y, b])


def test_fused_linear_cross_entropy_frozen_weight():
    h = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(11, 8, device=DEVICE)  # no grad: the kernel must skip dW
    y = torch.randint(0, 11, (5,), device=DEVICE)
    loss = fused_linear_cross_entropy(h, w, y)
    (2 * loss).backward()
    h_ref = h.detach().clone().requires_grad_()
    (2 * _linear_ce_ref(h_ref, w, y, None, 0.0, "mean")).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)


def test_fused_linear_cross_entropy_rejects_none_reduction():
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(torch.randn(2, 4, device=DEVICE), torch.randn(3, 4, device=DEVICE),
                                   torch.zeros(2, dtype=torch.long, device=DEVICE), reduction="none")


@pytest.mark.gpu
@pytest.mark.parametrize("v", [50257, 128256])
def test_fused_linear_cross_entropy_gpu_bf16(v):
    h = torch.randn(1025, 512).requires_grad_()
    w = (torch.randn(v, 512) / 512 ** 0.5).requires_grad_()
    y = _labels(1025, v)
    check_against_reference(lambda h, w, y: fused_linear_cross_entropy(h, w, y),
                            lambda h, w, y: _linear_ce_ref(h, w, y, None, 0.0, "mean"),
                            [h, w, y], dtype=torch.bfloat16, atol_floor=1e-3)


# ---- vocab-parallel cross-entropy: 2 real gloo ranks ---------------------------------------------------

_VP_CASES = [  # (tokens, vocab, smoothing, reduction, split: even / uneven / padded to a multiple of tp)
    (13, 98, 0.0, "mean", "even"),
    (6, 97, 0.1, "sum", "uneven"),
    (5, 40, 0.0, "none", "even"),
    (9, 37, 0.1, "none", "padded"),  # 2 shards of 19: the last column is padding holding garbage
    (4, 19, 0.1, "mean", "padded"),  # 2 shards of 10: rank 1 has 9 real columns
]


def _vp_worker(rank, world, init_file):
    import torch.distributed as dist

    from tests.kernels.conftest import assert_ratio
    from megatrain.ops.cross_entropy import vocab_parallel_cross_entropy_reference
    from megatrain.triton_kernels.vocab_parallel_cross_entropy import vocab_parallel_cross_entropy

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))  # an explicit group, not the default one
    try:
        for n, v, smoothing, reduction, split in _VP_CASES:
            gen = torch.Generator().manual_seed(n * 1000 + v)  # same data on every rank
            logits = 3 * torch.randn(n, v, generator=gen, dtype=torch.float64)
            labels = torch.randint(0, v, (n,), generator=gen)
            labels[torch.rand(n, generator=gen) < 0.25] = -100
            upstream = torch.randn(n if reduction == "none" else (), generator=gen, dtype=torch.float64)
            per = -(-v // world)
            bounds = {"uneven": [0, 40, v], "even": [0, v // 2, v], "padded": [0, per, 2 * per]}[split]
            lo, hi = bounds[rank], bounds[rank + 1]
            extra = {"uneven": dict(vocab_start=lo, vocab_size=v), "even": {}, "padded": dict(vocab_size=v)}[split]
            padded = torch.cat([logits, torch.full((n, 2 * per - v), 77.0, dtype=logits.dtype)], 1)  # garbage pad
            full = {}
            for dtype in (torch.float64, torch.float32):
                x = logits.detach().to(dtype).clone().requires_grad_()
                loss = cross_entropy_reference(x, labels, label_smoothing=smoothing, reduction=reduction)
                loss.backward(upstream.to(dtype))
                grad = torch.cat([x.grad, torch.zeros(n, padded.shape[1] - v, dtype=dtype)], 1)  # 0 on padding
                full[dtype] = (loss.detach(), grad[:, lo:hi])
            for name, fn in (("kernel", vocab_parallel_cross_entropy), ("torch", vocab_parallel_cross_entropy_reference)):
                x = padded[:, lo:hi].float().requires_grad_()
                loss = fn(x, labels, group, label_smoothing=smoothing, reduction=reduction, **extra)
                loss.backward(upstream.float())
                assert_ratio(f"{name} loss {n}x{v}", loss, full[torch.float32][0], full[torch.float64][0])
                assert_ratio(f"{name} grad {n}x{v}", x.grad, full[torch.float32][1], full[torch.float64][1])
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_vocab_parallel_cross_entropy_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_vp_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)


def test_ops_wiring_reaches_kernel(monkeypatch):
    from tests.kernels.conftest import force_triton

    from megatrain.ops.cross_entropy import fused_linear_cross_entropy_reference

    logits, labels = torch.randn(7, 30, device=DEVICE), _labels(7, 30).to(DEVICE)
    h, w = torch.randn(7, 8, device=DEVICE), torch.randn(30, 8, device=DEVICE)
    torch_path = force_triton(monkeypatch, "cross_entropy")
    got = torch_path.cross_entropy(logits, labels, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(got, cross_entropy_reference(logits, labels, label_smoothing=0.1, reduction="sum"))
    got = torch_path.fused_linear_cross_entropy(h, w, labels)
    torch.testing.assert_close(got, fused_linear_cross_entropy_reference(h, w, labels), rtol=1e-5, atol=1e-6)
    monkeypatch.undo()
    torch.testing.assert_close(torch_path.fused_linear_cross_entropy(h, w, labels), got, rtol=1e-5, atol=1e-6)


# ---- memory and fp16 (issue: no second N×V buffer when the logits are dead; 1/N never flushes fp16) -----

def test_dead_logits_receive_their_own_gradient(monkeypatch):
    """Through ops.cross_entropy(logits_dead=True) the gradient handed back is the logits' own storage:
    no second (N, V) buffer is allocated. Values equal the reference gradient."""
    from tests.kernels.conftest import force_triton

    ce = force_triton(monkeypatch, "cross_entropy")
    n, v = 11, 70
    x = torch.randn(n, 5, device=DEVICE, requires_grad=True)
    w = torch.randn(v, 5, device=DEVICE)
    labels = _labels(n, v).to(DEVICE)
    logits = x @ w.t()  # (N, V), dead after the loss: matmul saves its inputs, not its output
    ptr = logits.data_ptr()
    seen = []
    logits.register_hook(lambda g: seen.append(g.data_ptr()))
    ce.cross_entropy(logits, labels, logits_dead=True).backward()
    assert seen == [ptr]
    x_ref = x.detach().clone().requires_grad_()
    cross_entropy_reference(x_ref @ w.t(), labels).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    # without the flag the logits keep their values and the gradient is a separate buffer
    logits2 = x.detach() @ w.t()
    logits2.requires_grad_()
    before = logits2.detach().clone()
    ce.cross_entropy(logits2, labels).backward()
    assert logits2.grad.data_ptr() != logits2.data_ptr() and torch.equal(logits2.detach(), before)


def test_overwriting_logits_another_op_saved_raises():
    """exp() saves its output for backward; writing the gradient over it must fail loudly, not corrupt."""
    x = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    logits = x.exp()
    loss = cross_entropy(logits, _labels(6, 40).to(DEVICE), reuse_logits=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_fp16_mean_scale_does_not_flush_small_gradients():
    """N=256 rows whose small softmax entries are ~1e-5: times 1/N that is ~4e-8, under fp16's smallest
    subnormal (6e-8). The scale is applied in the backward together with the upstream gradient (a loss
    scale of 1024 here), so those entries survive with fp16 rounding only."""
    n, v = 256, 16
    base = torch.zeros(n, v)
    base[:, 0] = 11.5  # softmax(others) ≈ e^-11.5 ≈ 1e-5
    logits = (base + 0.01 * torch.randn(n, v)).to(DEVICE)
    labels = torch.zeros(n, dtype=torch.long, device=DEVICE)
    x16 = logits.half().requires_grad_()
    cross_entropy(x16, labels).backward(torch.tensor(1024.0, device=DEVICE))
    x64 = logits.double().cpu().requires_grad_()
    cross_entropy_reference(x64, labels.cpu()).backward(torch.tensor(1024.0, dtype=torch.float64))
    small = x64.grad[:, 1:]  # ≈ 1024 · 1e-5 / 256 ≈ 4e-5
    got = x16.grad[:, 1:].double().cpu()
    assert (got != 0).all(), "small gradients were flushed to zero"
    rel = ((got - small).abs() / small.abs()).max().item()
    assert rel < 2e-2, f"relative error {rel:.3g}"


def test_fp16_fused_linear_ce_keeps_small_gradients():
    from megatrain.triton_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
    from megatrain.ops.cross_entropy import fused_linear_cross_entropy_reference

    n, hid, v = 256, 4, 16
    h = torch.zeros(n, hid)
    h[:, 0] = 1.0
    w = 0.01 * torch.randn(v, hid)
    w[0, 0] = 11.5  # logit 11.5 on class 0, ~0 elsewhere: small softmax entries ≈ 1e-5
    labels = torch.zeros(n, dtype=torch.long)
    h16, w16 = h.half().to(DEVICE).requires_grad_(), w.half().to(DEVICE).requires_grad_()
    fused_linear_cross_entropy(h16, w16, labels.to(DEVICE), chunk_size=64).backward(
        torch.tensor(1024.0, device=DEVICE))
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    fused_linear_cross_entropy_reference(h64, w64, labels).backward(torch.tensor(1024.0, dtype=torch.float64))
    for name, got, ref in (("dW", w16.grad, w64.grad), ("dh", h16.grad, h64.grad)):
        got = got.double().cpu()
        assert torch.allclose(got, ref, rtol=3e-2, atol=1e-6), f"{name}: max diff {(got - ref).abs().max():.3g}"
    assert (w16.grad[1:, 0] != 0).all(), "dW rows of the small classes were flushed to zero"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lm_task_fused_linear_ce_equals_unfused(monkeypatch, arch):
    """train.fused_linear_ce=true: the LM task's loss and every parameter gradient equal the unfused path's
    (logits + CE), with both cross-entropies on the Triton kernels (interpreter, fp32)."""
    from tests.conftest import TINY_MODELS
    from tests.kernels.conftest import force_triton

    from megatrain.config import build_config
    from megatrain.models.transformer import build_transformer
    from megatrain.train.lm_task import LanguageModelingTask

    force_triton(monkeypatch, "cross_entropy")
    tree = {"model": {**TINY_MODELS[arch], "vocab_size": 97}, "data": {"path": "unused"}}
    losses, grads = {}, {}
    for fused in (False, True):
        cfg = build_config(tree, {"train.fused_linear_ce": fused, "train.label_smoothing": 0.05})
        task = LanguageModelingTask(cfg)
        model = build_transformer(cfg.model, seed=3).to(DEVICE)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 97, (2, 9), generator=g)
        labels = torch.randint(0, 97, (2, 9), generator=g)
        labels[0, :3] = -100
        loss, stats = task.loss_and_stats(model, {"input_ids": ids.to(DEVICE), "labels": labels.to(DEVICE)})
        loss.backward()
        losses[fused] = (loss.detach(), stats["count"])
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(losses[True][0], losses[False][0], rtol=1e-5, atol=1e-6)
    assert losses[True][1] == losses[False][1] == 15
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_linear_ce_refuses_layouts_it_cannot_serve():
    from megatrain.config import build_config
    from megatrain.errors import UserError
    from megatrain.train.lm_task import LanguageModelingTask

    tree = {"model": {"arch": "gpt2", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 50},
            "data": {"path": "unused"}}
    with pytest.raises(UserError, match="train.fused_linear_ce needs parallel.pp=1"):
        LanguageModelingTask(build_config(tree, {"train.fused_linear_ce": True, "parallel.zero_stage": 3}))
    with pytest.raises(UserError, match="train.fused_linear_ce needs a Transformer"):
        LanguageModelingTask(build_config({**tree, "model": {"arch": "lstm", "vocab_size": 50}},
                                          {"train.fused_linear_ce": True}))


@pytest.mark.gpu
def test_dead_logits_peak_memory_gpu():
    """8192 tokens × 32768 vocab bf16: with the logits dead, fwd+bwd allocates no second N×V buffer
    (peak extra < one logits' size), while the unfused torch path needs several."""
    n, v = 8192, 32768
    labels = torch.randint(0, v, (n,), device="cuda")
    nbytes = n * v * 2

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def dead():
        logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, requires_grad=True) * 1.0
        cross_entropy(logits, labels, reuse_logits=True).backward()

    def kept():
        logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, requires_grad=True) * 1.0
        cross_entropy(logits, labels).backward()

    # the leaf (+ its grad) is common to both; the difference is the kernel's own gradient buffer
    assert peak(kept) - peak(dead) >= 0.9 * nbytes


@pytest.mark.gpu
def test_fp32_attention_on_gpu_runs_sdpa_even_when_triton_is_asked(monkeypatch):
    from megatrain.ops import attention as ops_attention
    from megatrain.ops.attention import attention_reference

    monkeypatch.setattr(ops_attention, "backend_for", lambda op, device, **kw: "triton")
    called = []
    kernel = __import__("megatrain.triton_kernels.flash_attention", fromlist=["attention"])
    monkeypatch.setattr(kernel, "attention", lambda *a, **k: called.append(1))
    q = torch.randn(1, 2, 64, 64, device="cuda")
    out = ops_attention.attention(q, q, q, True)
    assert not called
    torch.testing.assert_close(out, attention_reference(q, q, q, True))
