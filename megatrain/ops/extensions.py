"""C++/CUDA extensions from csrc/: find a prebuilt library or JIT-build it, register providers, report.

Each extension is a shared library that registers ops under ``torch.ops.<namespace>`` (TORCH_LIBRARY;
no pybind11, which triples compile time). Lookup order per extension:

1. built by setup.py (``megatrain._ext_<name>``, see csrc/build.py);
2. a JIT build cached under ``$TORCH_EXTENSIONS_DIR/megatrain/<name>_<hash>/`` (hash of sources, flags,
   torch and CUDA versions, so an edit or an upgrade rebuilds and an unchanged tree never does);
3. a JIT build now, in a child process with a time limit (MEGATRAIN_EXT_BUILD_TIMEOUT, default 600 s)
   and its log kept, so a stuck compiler or a stale lock file is an error that names the fix, not a hang.

Anything failing leaves the torch path in place and says why once (``backend_report()`` lists it).
Environment: MEGATRAIN_NO_JIT=1 never compiles at run time; MEGATRAIN_EXT_VERBOSE=1 streams compiler output.

Report: ``backend_report()`` (rows of op -> backends), ``format_report()``; ``python -m megatrain.ops.extensions
[--build]`` prints it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatrain.ops.dispatch import OPS, available_backends, register

_CSRC = Path(__file__).resolve().parents[2] / "csrc"


def _load_spec():
    path = _CSRC / "spec.py"
    if not path.exists():
        return None
    module_spec = importlib.util.spec_from_file_location("megatrain_csrc_spec", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


SPEC = _load_spec()


@dataclass
class ExtStatus:
    name: str
    kind: str                      # "cpu" | "cuda"
    state: str = "not loaded"      # "loaded" | "unavailable" | "not loaded" (JIT on first use)
    how: str = ""                  # "prebuilt" | "jit (cached)" | "jit (built in 12.3 s)"
    detail: str = ""               # why unavailable, or the library path
    extra: dict = field(default_factory=dict)


_STATUS: dict[str, ExtStatus] = {}
_LOCK = threading.Lock()


def _say(msg: str) -> None:
    print(f"megatrain: {msg}", file=sys.stderr, flush=True)


def _info(name: str) -> dict:
    if SPEC is None or name not in SPEC.EXTENSIONS:
        raise KeyError(f"unknown extension {name!r}")
    return SPEC.EXTENSIONS[name]


def _status(name: str) -> ExtStatus:
    if name not in _STATUS:
        kind = _info(name)["kind"] if SPEC is not None and name in SPEC.EXTENSIONS else "?"
        _STATUS[name] = ExtStatus(name, kind)
    return _STATUS[name]


def _cuda_arch_list() -> str:
    """Arch list for a JIT build: the user's TORCH_CUDA_ARCH_LIST, else the GPUs present (fast build)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return SPEC.DEFAULT_CUDA_ARCH_LIST


def why_not_buildable(name: str) -> str | None:
    """Why a JIT build of ``name`` cannot run here (None when it can)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if SPEC is None:
        return f"csrc/ sources not found next to the package ({_CSRC}); reinstall from a source checkout"
    if os.environ.get("MEGATRAIN_NO_JIT") == "1":
        return "MEGATRAIN_NO_JIT=1"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler on PATH (install g++ or set CXX)"
    if shutil.which("ninja") is None:
        return "ninja not found (pip install ninja)"
    if _info(name)["kind"] == "cuda":
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU build"
        if CUDA_HOME is None:
            return "nvcc not found (set CUDA_HOME)"
    return None


def _build_dir(name: str) -> Path:
    info = _info(name)
    digest = hashlib.sha256()
    for rel in info["sources"] + info.get("headers", []) + ["spec.py"]:
        digest.update(rel.encode())
        digest.update((_CSRC / rel).read_bytes())
    digest.update(json.dumps([torch.__version__, torch.version.cuda, sys.version_info[:2]]).encode())
    if info["kind"] == "cuda":
        digest.update(_cuda_arch_list().encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch_extensions")
    return Path(root) / "megatrain" / f"{name}_{digest.hexdigest()[:12]}"


def _jit_build(name: str, build_dir: Path) -> str:
    """Compile ``name`` in a child process; returns the library path or raises RuntimeError."""
    info = _info(name)
    timeout = float(os.environ.get("MEGATRAIN_EXT_BUILD_TIMEOUT", "600"))
    build_dir.mkdir(parents=True, exist_ok=True)
    lock = build_dir / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > timeout:
        # torch's FileBaton waits forever on a lock left by a killed build: the classic silent hang
        _say(f"removing stale build lock {lock} (older than {timeout:.0f} s)")
        lock.unlink(missing_ok=True)
    args = {
        "name": f"megatrain_{name}",
        "sources": [str(_CSRC / s) for s in info["sources"]],
        "extra_cflags": SPEC.CPU_CFLAGS if info["kind"] == "cpu" else SPEC.HOST_FLAGS_FOR_CUDA,
        "extra_cuda_cflags": SPEC.NVCC_FLAGS if info["kind"] == "cuda" else None,
        "extra_ldflags": SPEC.CPU_LDFLAGS if info["kind"] == "cpu" else None,
        "build_directory": str(build_dir),
        "is_python_module": False,
        "verbose": True,
    }
    code = ("import json, sys, torch.utils.cpp_extension as ce; "
            "print('MEGATRAIN_LIB=' + ce.load(**json.loads(sys.argv[1])), flush=True)")
    env = dict(os.environ)
    if info["kind"] == "cuda":
        env["TORCH_CUDA_ARCH_LIST"] = _cuda_arch_list()
    log_path = build_dir / "build.log"
    _say(f"compiling C++ extension '{name}' (first use; ~20 s for the CPU one on 2 cores, longer for CUDA; "
         f"cached in {build_dir}, limit {timeout:.0f} s)")
    start = time.time()
    verbose = os.environ.get("MEGATRAIN_EXT_VERBOSE") == "1"
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: ninja and the compilers too
        output, _ = proc.communicate()
        log_path.write_text(output or "")
        lock.unlink(missing_ok=True)  # the killed build cannot release torch's lock itself
        raise RuntimeError(f"compiling '{name}' took over {timeout:.0f} s (MEGATRAIN_EXT_BUILD_TIMEOUT); "
                           f"log: {log_path}; set MEGATRAIN_NO_JIT=1 to use the torch fallback") from None
    log_path.write_text(output)
    if verbose:
        sys.stderr.write(output)
    lib = next((line.split("=", 1)[1] for line in output.splitlines() if line.startswith("MEGATRAIN_LIB=")), None)
    if proc.returncode != 0 or lib is None:
        errors = [line for line in output.splitlines() if "error" in line.lower()]
        first = errors[0].strip() if errors else (output.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"compiling '{name}' failed: {first[:300]} (full log: {log_path})")
    _status(name).how = f"jit (built in {time.time() - start:.1f} s)"
    return lib


def _prebuilt(name: str) -> str | None:
    """Path of the library setup.py built into the package, if any."""
    try:
        found = importlib.util.find_spec(SPEC.module_name(name))
    except (ImportError, ValueError):
        return None
    return found.origin if found is not None and found.origin and os.path.exists(found.origin) else None


def _find_lib(name: str) -> tuple[str | None, str]:
    """A library already on disk: (path, how) or (None, "")."""
    lib = _prebuilt(name)
    if lib is not None:
        return lib, "prebuilt"
    build_dir = _build_dir(name)
    libs = sorted(build_dir.glob("megatrain_*.so")) if build_dir.exists() else []
    if libs:
        return str(libs[-1]), "jit (cached)"
    return None, ""


def load(name: str, *, build: bool = True) -> bool:
    """Make ``torch.ops.<namespace>`` of extension ``name`` usable; False (with the reason kept) if not."""
    from megatrain.toolchain import pin_jit_toolchain
    pin_jit_toolchain()  # the venv's ninja and cache, whichever shell started this process
    with _LOCK:
        status = _status(name)
        if status.state == "loaded":
            return True
        if status.state == "unavailable":
            return False
        try:
            if status.kind == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("no CUDA device")
            lib, how = _prebuilt(name), "prebuilt"
            if lib is not None:
                try:
                    torch.ops.load_library(lib)
                except OSError as exc:  # built against another torch: an ABI mismatch, not a dead end
                    _say(f"prebuilt '{name}' does not load ({str(exc)[:160]}); trying a JIT build")
                    lib = None
            if lib is None:
                build_dir = _build_dir(name)
                libs = sorted(build_dir.glob("megatrain_*.so")) if build_dir.exists() else []
                if libs:
                    lib, how = str(libs[-1]), "jit (cached)"
                elif not build:
                    return False
                else:
                    reason = why_not_buildable(name)
                    if reason is not None:
                        raise RuntimeError(f"not built and cannot JIT-build: {reason}")
                    lib = _jit_build(name, build_dir)
                    how = status.how
                torch.ops.load_library(lib)
            getattr(torch.ops, _info(name)["namespace"])
        except Exception as exc:  # noqa: BLE001  (a build can fail in many ways; the fallback covers all)
            status.state, status.detail = "unavailable", str(exc)
            _say(f"C++ extension '{name}' unavailable ({exc}); using the torch fallback")
            return False
        status.state, status.how, status.detail = "loaded", how, lib
        return True


def ops(name: str):
    """``torch.ops.<namespace>`` of a loaded extension (RuntimeError naming the reason otherwise)."""
    if not load(name):
        raise RuntimeError(f"C++ extension '{name}' is unavailable: {_status(name).detail}")
    return getattr(torch.ops, _info(name)["namespace"])


# ---- CUDA providers for megatrain.ops dispatch ------------------------------------------------------

class _NormFunction(torch.autograd.Function):
    """LayerNorm (bias optional) or RMSNorm over the last dim through csrc/layer_norm.

    The kernel takes weight/bias in x's dtype (bf16 activations with fp32 weights get them cast once
    here); the weight/bias grads come back in the weight's own dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, rms: bool):
        hidden = x.shape[-1]
        x_2d = x.reshape(-1, hidden).contiguous()  # (rows, H)
        w = weight.to(x.dtype).contiguous()
        b = bias.to(x.dtype).contiguous() if bias is not None else None
        y_2d, mean, rstd = ops("layer_norm").forward(x_2d, w, b, eps, rms)
        ctx.save_for_backward(x_2d, w, mean, rstd)
        ctx.rms, ctx.has_bias, ctx.w_dtype = rms, bias is not None, weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        return y_2d.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x_2d, w, mean, rstd = ctx.saved_tensors
        dx_2d, dweight, dbias = ops("layer_norm").backward(
            dy.reshape(x_2d.shape).to(x_2d.dtype).contiguous(), x_2d, w, mean, rstd, ctx.rms, ctx.has_bias)
        dbias = dbias.to(ctx.b_dtype) if ctx.has_bias else None
        return dx_2d.view(dy.shape), dweight.to(ctx.w_dtype), dbias, None, None


def _cuda_norm_ok(x: torch.Tensor) -> bool:
    return x.is_cuda and x.numel() > 0 and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and load("layer_norm")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    if not _cuda_norm_ok(x):
        from megatrain.ops.norms import layer_norm_reference
        return layer_norm_reference(x, weight, bias, eps)
    return _NormFunction.apply(x, weight, bias, eps, False)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    if not _cuda_norm_ok(x):
        from megatrain.ops.norms import rms_norm_reference
        return rms_norm_reference(x, weight, eps)
    return _NormFunction.apply(x, weight, None, eps, True)


def adamw(param_groups, **kwargs):
    """Provider hook for dispatch: the CUDA fused multi-tensor AdamW optimizer."""
    from megatrain.ops.adamw import FusedAdamW
    return FusedAdamW(param_groups, **kwargs)


def _cuda_possible() -> bool:
    """Register CUDA providers only where they could load; the build itself waits for first use."""
    if SPEC is None or not torch.cuda.is_available():
        return False
    try:
        return any(_find_lib(n)[0] for n in ("layer_norm", "fused_adam")) or why_not_buildable("layer_norm") is None
    except Exception as exc:  # noqa: BLE001  (never let a probe break `import megatrain.ops`)
        _say(f"CUDA extensions not registered: {exc}")
        return False


if _cuda_possible():
    for _op in ("layer_norm", "rms_norm", "adamw"):
        register(_op, "cuda", __name__)


# ---- report ------------------------------------------------------------------------------------------

def backend_report(*, build: bool = False) -> dict:
    """Which backend can run each op, and the state of each C++/CUDA extension.

    ``build=True`` loads (and if needed JIT-builds) every extension first; otherwise unbuilt ones show
    as "not loaded". Returns {"ops": [{op, cpu, cuda}], "extensions": [{name, kind, state, how, detail}],
    "env": {...}} for ``megatrain env`` to print.
    """
    from torch.utils.cpp_extension import CUDA_HOME

    names = list(SPEC.EXTENSIONS) if SPEC is not None else []
    for name in names:
        if build:
            load(name)
        elif _status(name).state == "not loaded":
            lib, how = _find_lib(name)
            if lib:
                _status(name).how, _status(name).detail = how, f"on disk: {lib}"
    rows = [{"op": op, "cpu": available_backends(op, "cpu"), "cuda": available_backends(op, "cuda")} for op in OPS]
    cpu_adam = _status("cpu_adam") if "cpu_adam" in names else None
    if cpu_adam is None or cpu_adam.state == "unavailable":
        offload = ["torch"]
    elif cpu_adam.state == "loaded" or cpu_adam.how:
        offload = ["cpu_adam", "torch"]
    else:
        offload = (["cpu_adam (JIT on first use)"] if why_not_buildable("cpu_adam") is None else []) + ["torch"]
    rows.append({"op": "adamw (CPU / ZeRO offload)", "cpu": offload, "cuda": []})
    exts = [vars(_status(n)) | {"reason_if_jit_needed": why_not_buildable(n)} for n in names]
    if cpu_adam is not None and cpu_adam.state == "loaded":
        cpu_adam.extra["isas"] = list(ops("cpu_adam").isas())
    env = {
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "cuda_home": CUDA_HOME, "nvcc": shutil.which("nvcc"), "cxx": shutil.which(os.environ.get("CXX", "c++")),
        "ninja": shutil.which("ninja"), "threads": torch.get_num_threads(),
        "build_root": str(_build_dir(names[0]).parent) if names else None,
    }
    return {"ops": rows, "extensions": exts, "env": env}


def format_report(report: dict | None = None) -> str:
    report = report or backend_report()
    lines = [f"{'op':<28} {'cpu':<36} cuda"]
    lines += [f"{r['op']:<28} {','.join(r['cpu']):<36} {','.join(r['cuda']) or '-'}" for r in report["ops"]]
    lines.append("")
    lines.append(f"{'extension':<12} {'kind':<5} {'state':<12} {'how':<24} detail")
    for e in report["extensions"]:
        detail = e["detail"] or (f"JIT on first use" if e["reason_if_jit_needed"] is None
                                 else f"cannot JIT: {e['reason_if_jit_needed']}")
        if e["extra"]:
            detail += f" {e['extra']}"
        lines.append(f"{e['name']:<12} {e['kind']:<5} {e['state']:<12} {e['how']:<24} {detail}")
    lines.append("")
    lines += [f"{k:<15} {v}" for k, v in report["env"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="megatrain kernel backends and C++/CUDA extension status")
    parser.add_argument("--build", action="store_true", help="load/JIT-build every extension first")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    report = backend_report(build=args.build)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    # run the copy that megatrain.ops imported, so its load state is the one reported
    from megatrain.ops import extensions as _self
    sys.exit(_self.main())
