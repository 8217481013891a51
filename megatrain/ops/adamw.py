"""AdamW construction: the C++ CPU AdamW for CPU/offloaded states, the CUDA fused one where asked, torch's otherwise.

All three keep torch.optim.AdamW's state layout (``step``, ``exp_avg``, ``exp_avg_sq`` per param) and
hyper-parameter names, so a checkpoint moves between them and DeepSpeed's LR schedulers see ``lr``.
"""
from __future__ import annotations

import torch

from megatrain.ops import extensions
from megatrain.ops.dispatch import current_config
from megatrain.errors import UserError


class _AdamWBase(torch.optim.Optimizer):
    """Shared bookkeeping: lazy state, grouping params by step count, one extension call per bucket."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise UserError(f"AdamW: invalid lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _buckets(self, group) -> dict[tuple, list[tuple[torch.Tensor, ...]]]:
        """(step, dtype) -> [(param, grad, exp_avg, exp_avg_sq)] for params that have a grad."""
        buckets: dict[tuple, list] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise UserError(f"{type(self).__name__} does not take sparse gradients; use torch.optim.SparseAdam")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)  # same as torch.optim.AdamW (float32 CPU scalar)
                state["exp_avg"] = self._zeros_state(p)
                state["exp_avg_sq"] = self._zeros_state(p)
            state["step"] += 1
            key = (int(state["step"].item()), p.dtype)
            buckets.setdefault(key, []).append((p, p.grad, state["exp_avg"], state["exp_avg_sq"]))
        return buckets

    def _zeros_state(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for (step, dtype), items in self._buckets(group).items():
                self._update(group, step, dtype, items)
        return loss

    def _update(self, group, step: int, dtype: torch.dtype, items) -> None:
        """One backend call over ``items`` [(param, grad, exp_avg, exp_avg_sq)] sharing step and dtype."""
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts loaded state to each param's dtype; the moments here stay fp32 even for bf16/fp16
        # params (a bf16 round trip would lose their precision), so keep the saved fp32 tensors
        moments = {}
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved["params"], group["params"]):
                entry = state_dict["state"].get(pid, {})
                moments[p] = {k: entry[k] for k in ("exp_avg", "exp_avg_sq") if k in entry}
        super().load_state_dict(state_dict)
        for p, saved in moments.items():
            for key, value in saved.items():
                self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)


class CPUAdamW(_AdamWBase):
    """AdamW over fp32 CPU params through csrc/cpu_adam (AVX2/AVX-512, OpenMP); ZeRO CPU offload's optimizer.

    Matches torch.optim.AdamW elementwise (tests/kernels/test_cpu_adam.py). ``set_bf16_copy(param, t)``
    makes each step also write the rounded param into bf16 tensor ``t`` in the same pass.
    ``num_threads=0`` follows torch.get_num_threads(); ``isa`` forces "avx512" | "avx2" | "scalar".
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, num_threads: int = 0, isa: str = "auto"):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._ops = extensions.ops("cpu_adam")  # raises with the reason when the extension is unavailable
        self.num_threads, self.isa = num_threads, isa
        self._bf16: dict[torch.Tensor, torch.Tensor] = {}

    def _zeros_state(self, p: torch.Tensor) -> torch.Tensor:
        if p.numel() * 4 < (2 << 20):
            return super()._zeros_state(p)
        # huge-page-backed moments: ~13% faster steps on large partitions (csrc/cpu_adam/cpu_adam.h)
        return self._ops.zeros_state(p.numel(), self.num_threads).view(p.shape)

    def set_bf16_copy(self, param: torch.Tensor, copy: torch.Tensor) -> None:
        if copy.dtype != torch.bfloat16 or copy.shape != param.shape or not copy.is_contiguous():
            raise UserError(f"bf16 copy must be a contiguous bfloat16 tensor of shape {tuple(param.shape)}")
        self._bf16[param] = copy

    def _update(self, group, step: int, dtype: torch.dtype, items) -> None:
        beta1, beta2 = group["betas"]
        if dtype != torch.float32 or items[0][0].device.type != "cpu":
            raise UserError(f"CPUAdamW takes fp32 CPU params (got {dtype} on {items[0][0].device}); "
                             "keep fp32 master weights on CPU or use torch.optim.AdamW")
        params = [p for p, *_ in items]
        if not all(p.is_contiguous() for p in params):
            raise UserError("CPUAdamW needs contiguous params (ZeRO's flat partitions are); "
                             "call .contiguous() on the model's params")
        grads = [g.float().contiguous() for _, g, _, _ in items]  # no copy when already fp32 contiguous
        copies = [self._bf16.get(p) for p in params]
        self._ops.adamw_step(params, grads, [m for *_, m, _ in items], [v for *_, v in items],
                             copies if any(c is not None for c in copies) else [],
                             float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"], step,
                             self.num_threads, self.isa)


class FusedAdamW(_AdamWBase):
    """AdamW on CUDA through csrc/fused_adam: one multi-tensor launch per (step, dtype) bucket.

    Params fp32, bf16 or fp16 with fp32 moments; grads in the param dtype.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._ops = extensions.ops("fused_adam")

    def _update(self, group, step: int, dtype: torch.dtype, items) -> None:
        beta1, beta2 = group["betas"]
        grads = [g.to(p.dtype).contiguous() for p, g, _, _ in items]
        self._ops.adamw_step([p for p, *_ in items], grads, [m for *_, m, _ in items],
                             [v for *_, v in items], float(group["lr"]), beta1, beta2, group["eps"],
                             group["weight_decay"], step)


class TritonAdamW(_AdamWBase):
    """AdamW through the Triton multi-tensor kernel (megatrain.triton_kernels.adamw); fp32 params."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        from megatrain.triton_kernels.adamw import adamw_step  # ImportError without triton

        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._adamw_step = adamw_step

    def _update(self, group, step: int, dtype: torch.dtype, items) -> None:
        beta1, beta2 = group["betas"]
        self._adamw_step([p for p, *_ in items], [g.contiguous() for _, g, _, _ in items],
                         [m for *_, m, _ in items], [v for *_, v in items], step=step,
                         lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"])


def _first_device(param_groups: list) -> torch.device:
    for item in param_groups:  # a tensor, or a dict whose "params" is a tensor or a list of them
        params = item["params"] if isinstance(item, dict) else item
        for t in [params] if isinstance(params, torch.Tensor) else params:
            return t.device
    return torch.device("cpu")


def _first_dtype(param_groups: list) -> torch.dtype | None:
    for item in param_groups:
        params = item["params"] if isinstance(item, dict) else item
        for t in [params] if isinstance(params, torch.Tensor) else params:
            return t.dtype
    return None


def make_adamw(param_groups, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
               offload: bool = False, policy=None) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) over ``param_groups``; ``offload`` means the states live on CPU.

    Backend from ``model.kernel_overrides.adamw`` (else ``model.kernels``):
    - offload or CPU params: ``auto``/``cuda`` -> CPUAdamW (C++) when the extension loads, else
      torch.optim.AdamW (``cuda`` asked for explicitly raises instead); ``torch``/``triton`` -> torch.
      Under ZeRO offload DeepSpeed swaps the params for its fp32 CPU partitions; the ds_config needs
      ``"zero_force_ds_cpu_optimizer": false`` to accept this optimizer.
    - CUDA params: ``cuda`` -> FusedAdamW (csrc/fused_adam); ``triton`` -> TritonAdamW
      (kernels/adamw.py); ``torch`` -> torch.optim.AdamW(fused=True); ``auto`` -> torch's fused AdamW unless
      a benchmark record for this GPU class shows a kernel faster (ops/policy.py).
    """
    config = policy or current_config()
    backend = config.wanted("adamw")
    kw = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    param_groups = list(param_groups)
    device = _first_device(param_groups)
    if offload or device.type == "cpu":
        if backend in ("auto", "cuda"):
            if extensions.load("cpu_adam"):
                return CPUAdamW(param_groups, **kw)
            if backend == "cuda":
                raise UserError(f"model.kernel_overrides.adamw=cuda but the C++ CPU AdamW is unavailable "
                                 f"({extensions._status('cpu_adam').detail}); use auto or torch")
        return torch.optim.AdamW(param_groups, **kw)
    if backend == "auto":
        from megatrain.ops.dispatch import explain
        backend = explain("adamw", device, dtype=_first_dtype(param_groups), policy=config).backend
    if backend == "cuda":
        return FusedAdamW(param_groups, **kw)
    if backend == "triton":
        return TritonAdamW(param_groups, **kw)
    return torch.optim.AdamW(param_groups, **kw, fused=device.type == "cuda")
