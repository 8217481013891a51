"""CUDA fused multi-tensor AdamW (csrc/fused_adam) vs torch.optim.AdamW and an fp64 reference. GPU only."""
import pytest
import torch

from megatrain.ops import extensions

pytestmark = pytest.mark.gpu
HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
SIZES = (1, 7, 4097, 278011, 65536 * 3 + 5)


@pytest.fixture(scope="module")
def fa():
    assert extensions.load("fused_adam"), extensions._status("fused_adam").detail
    return extensions.ops("fused_adam")


def _call(fa, ps, gs, ms, vs, step):
    fa.adamw_step(ps, gs, ms, vs, HYPER["lr"], *HYPER["betas"], HYPER["eps"], HYPER["weight_decay"], step)


def _reference64(p, g, m, v, step):
    """One AdamW step in fp64 (decoupled decay, bias correction), returns (p, m, v)."""
    b1, b2 = HYPER["betas"]
    p = p * (1 - HYPER["lr"] * HYPER["weight_decay"])
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = (v.sqrt() / (1 - b2 ** step) ** 0.5) + HYPER["eps"]
    return p - HYPER["lr"] / (1 - b1 ** step) * m / denom, m, v


@pytest.mark.parametrize("numel", SIZES)
def test_fp32_matches_torch_adamw(fa, numel):
    gen = torch.Generator(device="cuda").manual_seed(numel)
    p = torch.randn(numel, device="cuda", generator=gen)
    ref = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([ref], **HYPER, foreach=False)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for step in range(1, 11):
        g = torch.randn(numel, device="cuda", generator=gen) * step
        ref.grad = g.clone()
        opt.step()
        _call(fa, [p], [g], [m], [v], step)
        scale = ref.detach().abs().max().item()
        torch.testing.assert_close(p, ref.detach(), rtol=1e-6, atol=1e-7 * scale)
        torch.testing.assert_close(m, opt.state[ref]["exp_avg"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v, opt.state[ref]["exp_avg_sq"], rtol=1e-6, atol=1e-12)


def test_multi_tensor_equals_single_tensor_bit_for_bit(fa):
    # 50 tensors (> 36-slot table) and one of 22M elements (> 320 chunks): exercises every table flush
    torch.manual_seed(0)
    sizes = [int(s) for s in torch.randint(1, 70_000, (50,))] + [22_000_003, 3]
    ps = [torch.randn(n, device="cuda") for n in sizes]
    gs = [torch.randn(n, device="cuda") for n in sizes]
    one = [t.clone() for t in ps]
    ms, vs = [torch.zeros_like(t) for t in ps], [torch.zeros_like(t) for t in ps]
    ms1, vs1 = [torch.zeros_like(t) for t in ps], [torch.zeros_like(t) for t in ps]
    for step in (1, 2):
        _call(fa, ps, gs, ms, vs, step)
        for i in range(len(sizes)):
            _call(fa, [one[i]], [gs[i]], [ms1[i]], [vs1[i]], step)
    for a, b in zip(ps + ms + vs, one + ms1 + vs1):
        assert torch.equal(a, b)


def test_unaligned_views_take_the_scalar_path(fa):
    base = torch.randn(4099, device="cuda")
    g = torch.randn(4099, device="cuda")
    p_view, g_view = base[1:4098], g[1:4098]  # 4 B offset: not 16-byte aligned
    p_copy = p_view.clone()
    m1, v1, m2, v2 = (torch.zeros(4097, device="cuda") for _ in range(4))
    _call(fa, [p_view], [g_view], [m1], [v1], 1)
    _call(fa, [p_copy], [g_view.clone()], [m2], [v2], 1)
    assert torch.equal(p_view, p_copy) and torch.equal(m1, m2) and torch.equal(v1, v2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_with_fp32_state(fa, dtype):
    """KERNELS.md rule: max|kernel - ref64| <= 2 * max|torch at dtype - ref64| + floor, over 10 steps."""
    numel = 278011
    gen = torch.Generator(device="cuda").manual_seed(1)
    p = torch.randn(numel, device="cuda", generator=gen).to(dtype)
    ref_t = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([ref_t], **HYPER)  # torch keeps its moments in the param dtype
    p64, m64, v64 = p.double(), torch.zeros(numel, device="cuda", dtype=torch.float64), None
    v64 = torch.zeros_like(m64)
    m, v = torch.zeros(numel, device="cuda"), torch.zeros(numel, device="cuda")
    for step in range(1, 11):
        g = torch.randn(numel, device="cuda", generator=gen).to(dtype)
        ref_t.grad = g.clone()
        opt.step()
        _call(fa, [p], [g], [m], [v], step)
        p64, m64, v64 = _reference64(p64, g.double(), m64, v64, step)
        ours, theirs = (p.double() - p64).abs().max().item(), (ref_t.detach().double() - p64).abs().max().item()
        assert not torch.isnan(p).any()
        assert ours <= 2 * theirs + 1e-3, f"step {step}: kernel err {ours:.3e} vs torch {dtype} err {theirs:.3e}"
    rel = ((p.double() - p64).norm() / p64.norm()).item()
    assert rel < 1e-2, rel


def test_optimizer_class_on_a_model(fa):
    from megatrain.ops.adamw import FusedAdamW

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(33, 65), torch.nn.GELU(), torch.nn.Linear(65, 3)).cuda()
    ref_model = torch.nn.Sequential(torch.nn.Linear(33, 65), torch.nn.GELU(), torch.nn.Linear(65, 3)).cuda()
    ref_model.load_state_dict(model.state_dict())
    opt, ref = FusedAdamW(model.parameters(), **HYPER), torch.optim.AdamW(ref_model.parameters(), **HYPER)
    x, y = torch.randn(64, 33, device="cuda"), torch.randn(64, 3, device="cuda")
    for _ in range(5):
        for mdl, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            torch.nn.functional.mse_loss(mdl(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_same_bits_as_the_cpu_adamw(fa):
    """Offloaded (csrc/cpu_adam) and on-GPU steps run the same IEEE-rounded sequence."""
    if not extensions.load("cpu_adam"):
        pytest.skip(f"CPU AdamW unavailable: {extensions._status('cpu_adam').detail}")
    cpu = extensions.ops("cpu_adam")
    torch.manual_seed(3)
    p, m, v = torch.randn(100_003), torch.zeros(100_003), torch.zeros(100_003)
    pc, mc, vc = p.cuda(), m.cuda(), v.cuda()
    for step in range(1, 4):
        g = torch.randn(100_003)
        cpu.adamw_step([p], [g], [m], [v], [], HYPER["lr"], *HYPER["betas"], HYPER["eps"], HYPER["weight_decay"],
                       step)
        _call(fa, [pc], [g.cuda()], [mc], [vc], step)
    assert torch.equal(p, pc.cpu()) and torch.equal(m, mc.cpu()) and torch.equal(v, vc.cpu())
