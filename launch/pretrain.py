"""Pretrain: `deepspeed launch/pretrain.py --config recipes/X.yaml [--section.key=value ...]`.

Also runs under `torchrun --nproc_per_node N` and plain `python` (one process)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.cli_args import parse, run_training  # noqa: E402


def main(argv=None):
    cfg, _, local_rank = parse(argv, description=__doc__)
    run_training(cfg, local_rank)


if __name__ == "__main__":
    main()
