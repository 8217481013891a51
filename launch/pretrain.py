"""Pretrain: `deepspeed launch/pretrain.py --config recipes/X.yaml [--section.key=value ...]`.

Also runs under `torchrun --nproc_per_node N` and plain `python` (one process). With
--data.force_prepare=true the text data is prepared again first (once per launch; docs/data.md)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.errors import UserError  # noqa: E402
from megatrain.cli_args import fail, parse, run_training  # noqa: E402


def main(argv=None):
    cfg, _, local_rank = parse(argv, description=__doc__)
    if cfg.data.force_prepare and cfg.data.dataset == "tokens":  # rebuild data.path first (once per launch)
        from megatrain.data.prepare import prepare_corpus
        try:
            prepare_corpus(cfg.data, seed=cfg.train.seed)
        except UserError as err:
            fail(err)
    run_training(cfg, local_rank)


if __name__ == "__main__":
    main()
