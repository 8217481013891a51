"""The `megatrain` command: `megatrain {prepare,train,generate,demo,env,config-docs} ...`.

`megatrain train` is `launch/pretrain.py` in-process (one rank); for several ranks use the launchers:
`deepspeed launch/pretrain.py ...` or `torchrun --nproc_per_node N launch/pretrain.py ...`."""
from __future__ import annotations

import os
import runpy
import sys

from megatrain.testing import ROOT

COMMANDS = {
    "prepare": "prepare a text corpus into token shards (launch/prepare.py)",
    "train": "pretrain one rank in-process (launch/pretrain.py)",
    "generate": "continue prompts with a checkpoint, saved model or HF dir (launch/generate.py)",
    "demo": "the make-demo flow: prepare + 2-rank run (torchrun, DeepSpeed engine) + summary",
    "env": "which kernel backends are available for each op",
    "config-docs": "print the config reference (markdown)",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: megatrain COMMAND [--config FILE] [--section.key=value ...]\n")
        for name, text in COMMANDS.items():
            print(f"  {name:12s} {text}")
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    cmd, rest = argv[0], argv[1:]
    if cmd in ("prepare", "train", "generate"):
        script = os.path.join(ROOT, "launch", {"train": "pretrain.py"}.get(cmd, f"{cmd}.py"))
        sys.argv = [script, *rest]
        runpy.run_path(script, run_name="__main__")
    elif cmd == "demo":
        from megatrain.demo import main as demo
        demo(rest)
    elif cmd == "env":
        from megatrain.env_report import print_report
        print_report()
    elif cmd == "config-docs":
        from megatrain.config.docs import config_reference
        print(config_reference())


if __name__ == "__main__":
    main()
