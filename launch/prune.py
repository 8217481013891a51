"""Prune: `python launch/prune.py --config recipes/X.yaml --prune.mlp=0.5 [--section.key=value ...]`.

Loads prune.source (a checkpoint, pruned dir or HF dir), removes the requested heads / MLP channels / blocks
by importance, optionally fine-tunes between steps, writes a smaller dense model to prune.out and a table.
Runs under `deepspeed`, `torchrun` or plain `python`, under any tp/dp layout (pp=1)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.cli_args import run_pass  # noqa: E402


def main(argv=None):
    run_pass(argv, __doc__, "megatrain.compress.passes:run_prune")


if __name__ == "__main__":
    main()
