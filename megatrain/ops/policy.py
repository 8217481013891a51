"""KernelPolicy: which backend runs each op, and why.

``model.kernels=auto`` means "proven fastest here": per op, the torch path (SDPA with its flash/cuDNN
backends, torch's fused AdamW, torch norms) unless a committed benchmark record for this GPU class shows the
custom kernel faster at the op's key shape and dtype. Records live in ``benchmarks/results/kernels_<class>.json``
(written by ``benchmarks/gpu_check.py``); no record means torch. An explicit ``triton``/``cuda`` is obeyed
where the backend is available. fp32 attention on a GPU never runs the Triton kernel: its fp32 path uses
IEEE dots (tf32 would miss fp32 accuracy), several times slower than SDPA.

Record file::

    {"gpu": "NVIDIA H100 80GB HBM3", "gpu_class": "H100", "torch": "2.11.0", "triton": "3.6.0", "date": "...",
     "records": [{"op": "rms_norm", "backend": "triton", "dtype": "bfloat16",
                  "shape": {"hidden": 4096, "tokens": 16384}, "ms": 0.081, "torch_ms": 0.102}]}
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field

import torch

# The shape fields that must equal the run's for a record to speak for it (other recorded fields, such as
# the token count, vary inside one run and are not matched). A custom kernel wins only if every matching
# record shows it faster.
KEY_FIELDS = {"attention": ("head_dim", "causal"), "layer_norm": ("hidden",), "rms_norm": ("hidden",),
              "cross_entropy": ("vocab",), "swiglu": ("ffn",), "rope": ("head_dim",), "adamw": ()}


def records_dir() -> str:
    """``$MEGATRAIN_BENCH_RESULTS``, else the checkout's benchmarks/results."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.environ.get("MEGATRAIN_BENCH_RESULTS", os.path.join(here, "benchmarks", "results"))


def gpu_class(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'H100', 'NVIDIA A100-SXM4-80GB' → 'A100', 'NVIDIA GeForce RTX 4090' → 'RTX4090'."""
    text = name.upper().replace("NVIDIA", "").replace("GEFORCE", "")
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", text)
    if m:
        return m.group(1)
    m = re.search(r"RTX\s*(\d{4})", text)
    if m:
        return f"RTX{m.group(1)}"
    return re.sub(r"[^A-Z0-9]+", "_", text).strip("_") or "UNKNOWN"


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def load_records(gpu: str, directory: str | None = None) -> tuple[str | None, list[dict]]:
    """(file, records) for the GPU class of ``gpu`` (a device name); (None, []) when none is committed."""
    cls = gpu_class(gpu)
    for path in sorted(glob.glob(os.path.join(directory or records_dir(), "kernels_*.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue  # a broken record is no proof; torch stays the choice
        if doc.get("gpu_class") == cls or gpu_class(doc.get("gpu", "")) == cls:
            return os.path.basename(path), list(doc.get("records", []))
    return None, []


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str


def _dtype_name(dtype) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


@dataclass
class KernelPolicy:
    """The kernel choice of one run: ``default`` backend, per-op ``overrides``, the GPU's benchmark records."""
    default: str = "auto"
    overrides: dict[str, str] = field(default_factory=dict)
    gpu: str | None = None          # device name; None = ask torch when first needed
    directory: str | None = None    # where the records are; None = records_dir()
    _records: tuple | None = None
    _cache: dict = field(default_factory=dict)

    def wanted(self, op: str) -> str:
        return self.overrides.get(op, self.default)

    def records(self) -> tuple[str | None, list[dict]]:
        if self._records is None:
            self._records = load_records(self.gpu or device_name(), self.directory)
        return self._records

    def resolve_auto(self, op: str, available: list[str], *, dtype=None, shape: dict | None = None) -> Choice:
        """What ``auto`` picks among ``available`` (torch last) for ``op`` at ``dtype``/``shape``."""
        key = (op, tuple(available), _dtype_name(dtype), tuple(sorted((shape or {}).items())))
        if key not in self._cache:
            self._cache[key] = self._resolve(op, available, dtype=dtype, shape=shape or {})
        return self._cache[key]

    def _resolve(self, op, available, *, dtype, shape) -> Choice:
        custom = [b for b in available if b != "torch"]
        if not custom:
            return Choice("torch", "no custom kernel available on this device")
        if op == "attention" and _dtype_name(dtype) == "float32":
            return Choice("torch", "fp32 attention: SDPA (the Triton kernel's fp32 path uses slow IEEE dots)")
        gpu = self.gpu or device_name()
        path, records = self.records()
        if path is None:
            return Choice("torch", f"no benchmark record for {gpu_class(gpu)} under benchmarks/results/")
        keys = KEY_FIELDS.get(op, ())
        best = None
        for backend in custom:
            rows = [r for r in records if r.get("op") == op and r.get("backend") == backend]
            if dtype is not None:
                rows = [r for r in rows if r.get("dtype") == _dtype_name(dtype)]
            rows = [r for r in rows if all(k not in shape or r.get("shape", {}).get(k) == shape[k] for k in keys)]
            if not rows:
                continue
            speedups = [float(r["torch_ms"]) / float(r["ms"]) for r in rows if float(r.get("ms", 0)) > 0]
            if not speedups:
                continue
            worst = min(speedups)
            if best is None or worst > best[1]:
                best = (backend, worst, len(rows))
        at = ", ".join(f"{k}={shape[k]}" for k in keys if k in shape) or "any shape"
        what = f"{at}{', ' + _dtype_name(dtype) if dtype is not None else ''}"
        if best is None:
            return Choice("torch", f"{path}: no record for {op} at {what}")
        backend, worst, n = best
        if worst > 1.0:
            return Choice(backend, f"{path}: {backend} ≥ {worst:.2f}× torch at {what} ({n} record(s))")
        return Choice("torch", f"{path}: {backend} only {worst:.2f}× torch at {what} ({n} record(s))")
