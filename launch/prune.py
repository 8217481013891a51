"""Prune: `python launch/prune.py --config recipes/X.yaml --prune.mlp=0.5 [--section.key=value ...]`.

Loads prune.source (a checkpoint, pruned dir or HF dir), removes the requested heads / MLP channels / blocks
by importance, optionally fine-tunes between steps, writes a smaller dense model to prune.out and a table.
Runs under `deepspeed`, `torchrun` or plain `python`, under any tp/dp layout (pp=1)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.cli_args import fail, parse  # noqa: E402


def main(argv=None):
    cfg, _, local_rank = parse(argv, description=__doc__)
    from megatrain.compress.passes import run_prune
    try:
        run_prune(cfg, local_rank=local_rank)
    except ValueError as err:
        fail(err)


if __name__ == "__main__":
    main()
