"""setup.py hook: the C++/CUDA extensions when a toolchain is present; never breaks the install.

- CPU AdamW: built when a C++ compiler is found.
- CUDA fused AdamW and LayerNorm: built when torch has CUDA and nvcc is found; TORCH_CUDA_ARCH_LIST is
  honoured, default spec.DEFAULT_CUDA_ARCH_LIST (includes 9.0a).
- Any failure (no torch in an isolated build env, no compiler, a compile error) prints one line and the
  install goes on; megatrain/ops/extensions.py then JIT-builds on first use or falls back to torch.
  Set MEGATRAIN_NO_EXT=1 to skip the extensions entirely.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys

from csrc import spec

_ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"megatrain build: {msg}", file=sys.stderr, flush=True)


def _cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _cuda_reason(torch, cuda_home) -> str | None:
    """Why the CUDA extensions cannot be built here, or None when they can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return "nvcc not found (set CUDA_HOME)"
    return None


def extensions_and_cmdclass():
    """(ext_modules, cmdclass) for setup(); ([], {}) when nothing can be built."""
    if os.environ.get("MEGATRAIN_NO_EXT") == "1":
        _say("MEGATRAIN_NO_EXT=1: skipping C++/CUDA extensions (torch fallbacks are used)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # noqa: BLE001  (isolated build env without torch, broken torch)
        _say(f"torch not importable at build time ({type(exc).__name__}); extensions will JIT-build on first "
             "use. To prebuild: pip install --no-build-isolation -e .")
        return [], {}
    if _cxx() is None:
        _say("no C++ compiler found (set CXX); extensions skipped, torch fallbacks are used")
        return [], {}

    def src(name: str) -> list[str]:
        # setup.py wants paths relative to its own directory
        return [os.path.relpath(os.path.join(_ROOT, p), os.path.dirname(_ROOT)) for p in spec.EXTENSIONS[name]["sources"]]

    ext_modules = []
    cuda_reason = _cuda_reason(torch, CUDA_HOME)
    for name, info in spec.EXTENSIONS.items():
        if info["kind"] == "cpu":
            ext_modules.append(CppExtension(spec.module_name(name), src(name),
                                             extra_compile_args={"cxx": spec.CPU_CFLAGS},
                                             extra_link_args=spec.CPU_LDFLAGS))
        elif cuda_reason is None:
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", spec.DEFAULT_CUDA_ARCH_LIST)
            ext_modules.append(CUDAExtension(spec.module_name(name), src(name),
                                             extra_compile_args={"cxx": spec.HOST_FLAGS_FOR_CUDA,
                                                                 "nvcc": spec.NVCC_FLAGS}))
    if cuda_reason is not None:
        _say(f"CUDA extensions skipped: {cuda_reason}")
    else:
        _say(f"CUDA extensions for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")

    class SafeBuildExt(BuildExtension):
        """A failing extension is reported and dropped; the rest of the install goes on."""

        failed: set[str] = set()

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001  (compiler errors come as several types)
                self.failed.add(ext.name)
                first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                _say(f"building {ext.name} failed ({first}); it will JIT-build on first use or fall back to torch")

        @contextlib.contextmanager
        def _built_only(self):
            keep = self.extensions
            self.extensions = [e for e in keep if e.name not in self.failed]
            try:
                yield
            finally:
                self.extensions = keep

        def copy_extensions_to_source(self):
            with self._built_only():
                super().copy_extensions_to_source()

        def get_outputs(self):
            with self._built_only():
                return super().get_outputs()

        def get_output_mapping(self):
            with self._built_only():
                return super().get_output_mapping()

    return ext_modules, {"build_ext": SafeBuildExt}
