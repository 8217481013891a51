"""C++ CPU AdamW (csrc/cpu_adam) against torch.optim.AdamW: elementwise, bf16 copy-out, thread/ISA invariance."""
import os

import pytest
import torch

from megatrain.ops import adamw as adamw_mod
from megatrain.ops import dispatch, extensions

SIZES = (1, 7, 4097, 278011)
HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


@pytest.fixture(scope="module")
def cpu_ops():
    reason = extensions.why_not_buildable("cpu_adam")
    if reason is not None and extensions._find_lib("cpu_adam")[0] is None:
        pytest.skip(f"C++ CPU AdamW cannot be built here: {reason}")
    # buildable means it must load: a compile error fails the suite instead of hiding behind a skip
    assert extensions.load("cpu_adam"), extensions._status("cpu_adam").detail
    return extensions.ops("cpu_adam")


def _step(ops, params, grads, ms, vs, step, copies=(), threads=0, isa="auto", **hyper):
    h = {**HYPER, **hyper}
    ops.adamw_step(params, grads, ms, vs, list(copies), h["lr"], h["betas"][0], h["betas"][1], h["eps"],
                   h["weight_decay"], step, threads, isa)


@pytest.mark.parametrize("numel", SIZES)
def test_matches_torch_adamw_elementwise(cpu_ops, numel):
    gen = torch.Generator().manual_seed(numel)
    p = torch.randn(numel, generator=gen)
    ref = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([ref], **HYPER)
    m, v = torch.full((numel,), float("nan")), torch.full((numel,), float("nan"))
    m.zero_(), v.zero_()  # poisoned then explicitly initialised: nothing reads uninitialised memory
    copy = torch.full((numel,), float("nan"), dtype=torch.bfloat16)
    for step in range(1, 11):
        g = torch.randn(numel, generator=gen) * (0.1 + step)  # fresh grads, varying scale
        ref.grad = g.clone()
        opt.step()
        _step(cpu_ops, [p], [g], [m], [v], step, copies=[copy])
        want = ref.detach()
        scale = want.abs().max().item()
        diff = (p - want).abs().max().item()
        assert diff <= 1e-6 * scale, f"step {step}: max|p-ref| {diff:.3e} > 1e-6 * {scale:.3e}"
        # elementwise too: each param within 1e-6 of its own magnitude (plus an fp32 ulp-scale floor)
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7 * scale)
        torch.testing.assert_close(m, opt.state[ref]["exp_avg"], rtol=1e-6, atol=0)
        torch.testing.assert_close(v, opt.state[ref]["exp_avg_sq"], rtol=1e-6, atol=0)
        assert torch.equal(copy, p.to(torch.bfloat16)), "bf16 copy-out differs from p.to(torch.bfloat16)"
    assert not torch.isnan(p).any()


def test_bf16_copy_rounds_like_torch_on_edge_values(cpu_ops):
    # lr=0, wd=0, g=0 leaves p unchanged, so the copy-out sees exactly these bit patterns
    low = torch.tensor([0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x18000 & 0xFFFF], dtype=torch.int32)
    high = torch.tensor([0x3F80, 0x3F81, 0xBF80, 0x0001, 0x7F7F, 0x0000, 0x8000], dtype=torch.int32)
    bits = (high[:, None] << 16 | low[None, :]).flatten()  # ties to even/odd, denormals, max finite, -0
    p = bits.view(torch.float32).clone()
    p = torch.cat([p, torch.tensor([float("inf"), -float("inf"), 3.4028235e38, -1e-45])])
    p = torch.cat([p, torch.randn(1000)])
    n = p.numel()
    copy = torch.empty(n, dtype=torch.bfloat16)
    expect = p.to(torch.bfloat16)
    _step(cpu_ops, [p], [torch.zeros(n)], [torch.zeros(n)], [torch.zeros(n)], 1, copies=[copy], lr=0.0,
          weight_decay=0.0)
    assert torch.equal(copy.view(torch.int16), expect.view(torch.int16))
    nan = torch.tensor([float("nan")] * 9)
    copy9 = torch.empty(9, dtype=torch.bfloat16)
    _step(cpu_ops, [nan], [torch.zeros(9)], [torch.zeros(9)], [torch.zeros(9)], 1, copies=[copy9], lr=0.0,
          weight_decay=0.0)
    assert torch.isnan(copy9.float()).all()


def _run_many(ops, threads, isa="auto", steps=3):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(n, generator=gen) for n in SIZES + (16384 * 3 + 5,)]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    copies = [torch.empty(p.numel(), dtype=torch.bfloat16) for p in ps]
    for step in range(1, steps + 1):
        gs = [torch.randn(p.numel(), generator=gen) for p in ps]
        _step(ops, ps, gs, ms, vs, step, copies=copies, threads=threads, isa=isa)
    return ps + ms + vs + copies


def test_threaded_equals_single_thread_bit_for_bit(cpu_ops):
    one = _run_many(cpu_ops, threads=1)
    for threads in (2, 3, 7):
        other = _run_many(cpu_ops, threads=threads)
        assert all(torch.equal(a, b) for a, b in zip(one, other)), f"{threads} threads differ from 1"
    # default threads follow torch.set_num_threads
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = _run_many(cpu_ops, threads=0)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, serial))


def test_every_isa_gives_the_same_bits(cpu_ops):
    isas = list(cpu_ops.isas())
    assert "scalar" in isas
    reference = _run_many(cpu_ops, threads=2, isa="scalar")
    for isa in isas:
        got = _run_many(cpu_ops, threads=2, isa=isa)
        assert all(torch.equal(a, b) for a, b in zip(reference, got)), f"isa {isa} differs from scalar"


def test_clear_errors(cpu_ops):
    p, g = torch.zeros(8), torch.zeros(8)
    with pytest.raises(RuntimeError, match="not contiguous"):
        _step(cpu_ops, [torch.zeros(8, 2).t()], [torch.zeros(2, 8)], [torch.zeros(2, 8)], [torch.zeros(2, 8)], 1)
    with pytest.raises(RuntimeError, match="expected Float"):
        _step(cpu_ops, [p.double()], [g], [g.clone()], [g.clone()], 1)
    with pytest.raises(RuntimeError, match="not supported on this CPU|isa"):
        _step(cpu_ops, [p], [g], [g.clone()], [g.clone()], 1, isa="sve")


def test_optimizer_class_matches_torch_on_a_model(cpu_ops):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.GELU(), torch.nn.Linear(31, 3))
    ref_model = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.GELU(), torch.nn.Linear(31, 3))
    ref_model.load_state_dict(model.state_dict())

    def groups(m):  # two groups: no decay on biases, a different lr
        return [{"params": [m[0].weight, m[2].weight]}, {"params": [m[0].bias, m[2].bias], "weight_decay": 0.0,
                                                          "lr": 3e-3}]

    opt = adamw_mod.CPUAdamW(groups(model), **HYPER)
    ref = torch.optim.AdamW(groups(ref_model), **HYPER)
    copy = torch.empty_like(model[0].weight, dtype=torch.bfloat16)
    opt.set_bf16_copy(model[0].weight, copy)
    x, y = torch.randn(64, 13), torch.randn(64, 3)
    for step in range(5):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            if step == 2:
                m[2].bias.grad = None  # a param without a grad this step keeps its own step count
            o.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert torch.equal(copy, model[0].weight.detach().to(torch.bfloat16))
    # state layout is torch's: a checkpoint moves between the two optimizers
    ref.load_state_dict(opt.state_dict())
    assert ref.state_dict()["state"][3]["step"].item() == 4


def test_make_adamw_picks_cpu_adam(cpu_ops):
    params = [torch.nn.Parameter(torch.randn(5))]
    assert isinstance(adamw_mod.make_adamw(params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0),
                      adamw_mod.CPUAdamW)
    assert isinstance(adamw_mod.make_adamw(params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                                           offload=True), adamw_mod.CPUAdamW)
    saved = dispatch.current_config()
    default, overrides = saved.default, dict(saved.overrides)
    try:
        dispatch.configure("auto", {"adamw": "torch"})
        opt = adamw_mod.make_adamw(params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
        assert type(opt) is torch.optim.AdamW
    finally:
        dispatch.configure(default, overrides)


def test_triton_adamw_class_matches_torch():
    """The ``triton`` choice of make_adamw; on CPU it runs under TRITON_INTERPRET=1 (tests/kernels/conftest.py)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 set before the kernels import")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4097, device=device))
    ref = torch.nn.Parameter(p.detach().clone())
    opt, ref_opt = adamw_mod.TritonAdamW([p], **HYPER), torch.optim.AdamW([ref], **HYPER, foreach=False)
    for _ in range(3):
        g = torch.randn(4097, device=device)
        p.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(p, ref, rtol=1e-6, atol=1e-7)


def test_backend_report_lists_extensions(cpu_ops):
    report = extensions.backend_report()
    by_name = {e["name"]: e for e in report["extensions"]}
    assert by_name["cpu_adam"]["state"] == "loaded" and by_name["cpu_adam"]["extra"]["isas"][-1] == "scalar"
    assert {"fused_adam", "layer_norm"} <= set(by_name)
    offload = next(r for r in report["ops"] if r["op"].startswith("adamw (CPU"))
    assert offload["cpu"][0] == "cpu_adam"
    assert "cpu_adam" in extensions.format_report(report)


def test_load_state_dict_keeps_fp32_moments_for_low_precision_params(cpu_ops):
    # torch.optim casts loaded state to the param dtype; a bf16 param's fp32 moments must survive
    p = torch.nn.Parameter(torch.randn(10).to(torch.bfloat16))
    opt = adamw_mod.CPUAdamW([p], **HYPER)
    m = torch.randn(10) * 1e-3 + 1.0001  # not representable in bf16
    opt.load_state_dict({"state": {0: {"step": torch.tensor(3.0), "exp_avg": m, "exp_avg_sq": m.abs()}},
                         "param_groups": [{**opt.param_groups[0], "params": [0]}]})
    assert opt.state[p]["exp_avg"].dtype == torch.float32 and torch.equal(opt.state[p]["exp_avg"], m)
    assert opt.state[p]["exp_avg"].data_ptr() != m.data_ptr()  # a copy, not the caller's tensor
