"""`megatrain env`: versions, devices and the kernel backend each op would use."""
from __future__ import annotations

import os
import platform

import torch


def report_rows() -> list[tuple[str, str]]:
    from megatrain.ops.dispatch import OPS, available_backends, explain
    from megatrain.ops.policy import device_name, gpu_class, load_records
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [("python", platform.python_version()), ("torch", torch.__version__),
            ("cuda", torch.version.cuda or "none (CPU build)" if not torch.cuda.is_available() else torch.cuda.get_device_name()),
            ("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "(auto)"))]
    for mod in ("deepspeed", "triton", "transformers"):
        try:
            rows.append((mod, __import__(mod).__version__))
        except Exception as err:  # report, never fail: this command exists to diagnose broken installs
            rows.append((mod, f"unavailable ({err.__class__.__name__})"))
    if device == "cuda":
        path, records = load_records(device_name())
        rows.append(("kernel records", f"{gpu_class(device_name())}: {path} ({len(records)} records)" if path
                     else f"{gpu_class(device_name())}: none under benchmarks/results/ (auto = torch everywhere)"))
    for op in OPS:
        try:  # at any shape and dtype: a run resolves per call, with its own shapes (ops/policy.py)
            choice = explain(op, device)
            chosen = f"{choice.backend}: {choice.reason}"
        except ValueError as err:
            chosen = f"error: {err}"
        rows.append((f"op {op}", f"{chosen}  (available on {device}: {', '.join(available_backends(op, device))})"))
    return rows


def print_report() -> None:
    for key, value in report_rows():
        print(f"{key:22s} {value}")
    try:
        from megatrain.ops.extensions import format_report
        print()
        print(format_report())
    except ImportError as err:
        print(f"C++/CUDA extensions: report unavailable ({err})")
