"""Which backend runs each op, under a KernelPolicy (ops/policy.py).

A run's policy is built from its config (:func:`policy_from_config`) and handed to the model by the kernels
transform (``ops.kernels.use_kernels``) and to the loss and the optimizer: every op takes ``policy=``. An op called
without one (a benchmark, a test, a script) uses the default policy, which ``configure`` replaces."""
from __future__ import annotations

import functools
import importlib

import torch
from megatrain.errors import UserError
from megatrain.ops.policy import Choice, KernelPolicy

BACKENDS = ("auto", "triton", "cuda", "torch")
OPS = ("attention", "layer_norm", "rms_norm", "cross_entropy", "swiglu", "rope", "adamw")

KernelConfig = KernelPolicy  # the old name: .default and .overrides are the same fields

_CONFIG = KernelPolicy()
# Op name -> backend name -> module that provides it (imported lazily: triton import is slow and
# absent on some machines; the torch path must never pay for it).
_PROVIDERS: dict[str, dict[str, str]] = {}


def register(op: str, backend: str, module: str) -> None:
    """Declare that ``module`` implements ``op`` for ``backend`` (module exposes ``<op>``)."""
    _PROVIDERS.setdefault(op, {})[backend] = module
    _available.cache_clear()


def make_policy(default: str = "auto", overrides: dict[str, str] | None = None, *, gpu: str | None = None,
                records_dir: str | None = None) -> KernelPolicy:
    """A validated policy; a bad backend or op name is one line naming the field."""
    overrides = dict(overrides or {})
    for name, value in [("model.kernels", default)] + [(f"model.kernel_overrides.{k}", v) for k, v in overrides.items()]:
        if value not in BACKENDS:
            raise UserError(f"{name}={value!r} is not a backend; use one of {', '.join(BACKENDS)}")
    for op in overrides:
        if op not in OPS:
            raise UserError(f"model.kernel_overrides has unknown op {op!r}; known ops: {', '.join(OPS)}")
    return KernelPolicy(default=default, overrides=overrides, gpu=gpu, directory=records_dir)


def policy_from_config(model_cfg) -> KernelPolicy:
    """The policy of a run: ``model.kernels`` / ``model.kernel_overrides``."""
    return make_policy(model_cfg.kernels, model_cfg.kernel_overrides)


def configure(default: str = "auto", overrides: dict[str, str] | None = None, *, gpu: str | None = None,
              records_dir: str | None = None) -> KernelPolicy:
    """Replace the default policy (the one ops use when called without ``policy=``)."""
    global _CONFIG
    _CONFIG = make_policy(default, overrides, gpu=gpu, records_dir=records_dir)
    return _CONFIG


def current_config() -> KernelPolicy:
    return _CONFIG


current_policy = current_config


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # ImportError, or a toolchain error inside a JIT build
        return False


def available_backends(op: str, device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run ``op`` on ``device``; ``torch`` is always last (``auto`` decides by records)."""
    return list(_available(op, torch.device(device).type))


@functools.lru_cache(maxsize=None)
def _available(op: str, device_type: str) -> tuple[str, ...]:
    found = []
    for backend in ("triton", "cuda"):
        module = _PROVIDERS.get(op, {}).get(backend)
        if module is None:
            continue
        if device_type != "cuda":
            continue  # Triton's interpreter runs on CPU for tests only, never as a training path
        if _importable(module):
            found.append(backend)
    return tuple(found) + ("torch",)


def explain(op: str, device: torch.device | str = "cpu", *, dtype=None, shape: dict | None = None,
            policy: KernelPolicy | None = None) -> Choice:
    """The backend ``op`` runs on ``device`` at ``dtype``/``shape`` under ``policy``, and why."""
    policy = policy or _CONFIG
    wanted = policy.wanted(op)
    available = available_backends(op, device)
    if wanted == "auto":
        if torch.device(device).type != "cuda":
            return Choice("torch", f"{torch.device(device).type} tensors run the torch path")
        return policy.resolve_auto(op, available, dtype=dtype, shape=shape)
    if wanted not in available:
        raise UserError(
            f"model.kernels: backend {wanted!r} for op {op!r} is not available on {torch.device(device)} "
            f"(available: {', '.join(available)}); use model.kernels=auto or torch"
        )
    return Choice(wanted, f"model.kernels / kernel_overrides = {wanted}")


def backend_for(op: str, device: torch.device | str = "cpu", *, dtype=None, shape: dict | None = None,
                policy: KernelPolicy | None = None) -> str:
    """``explain``'s backend; called on every op of every forward, so the common answer skips building a reason."""
    policy = policy or _CONFIG
    if policy.wanted(op) == "auto" and torch.device(device).type != "cuda":
        return "torch"
    return explain(op, device, dtype=dtype, shape=shape, policy=policy).backend


def provider(op: str, backend: str):
    """The callable implementing ``op`` for a non-torch backend."""
    return getattr(importlib.import_module(_PROVIDERS[op][backend]), op)
