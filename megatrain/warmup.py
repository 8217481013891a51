"""Build the JIT ops once, sequentially, at install time (`make install` runs this).

Otherwise the first training ranks all start the same compile at once and wait on one lock; a build
killed half way would leave that lock behind and every later run waiting on it. Run it again any time:
builds are cached, so it returns in seconds. Every build uses the ninja and cache that
``megatrain.toolchain.pin_jit_toolchain`` chose (printed first), so a later run from another shell finds them current."""
from __future__ import annotations

import os
import shutil
import time

from megatrain.toolchain import prepare_process


def main() -> None:
    prepare_process()  # the DeepSpeed accelerator and the ninja/cache every later build uses
    t0 = time.perf_counter()
    print(f"warmup: ninja {shutil.which('ninja') or 'not found'}, cache "
          f"{os.environ.get('TORCH_EXTENSIONS_DIR') or '~/.cache/torch_extensions'}")
    try:
        from deepspeed.comm.torch import build_shm_op
        status = "built" if build_shm_op() is not None else "not used on this machine"
    except Exception as err:  # a missing compiler: DeepSpeed then falls back to plain gloo collectives
        status = f"unavailable ({err.__class__.__name__}: {err})".splitlines()[0]
    print(f"warmup: DeepSpeed shared-memory comm op: {status}")
    try:
        from megatrain.ops import extensions
        ok = extensions.load("cpu_adam")
        print(f"warmup: megatrain C++ CPU AdamW: {'ready' if ok else 'unavailable (torch AdamW is used)'}")
    except Exception as err:
        print(f"warmup: megatrain C++ CPU AdamW unavailable ({err.__class__.__name__}); torch AdamW is used")
    print(f"warmup: done in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
