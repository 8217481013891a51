"""Pretrain: `deepspeed launch/pretrain.py --config recipes/X.yaml [--section.key=value ...]`.

Also runs under `torchrun --nproc_per_node N` and plain `python` (one process). With
--data.force_prepare=true the text data is prepared again first (once per launch; docs/data.md).
With --model.from_hf=DIR (continued pretraining) the architecture comes from DIR/config.json exactly as in
launch/finetune.py: a conflicting --model.* override is refused, every tensor is checked before data work, and the
tokenizer defaults to DIR's (megatrain.interop.hf.resolve_from_hf, shared by both)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.errors import UserError  # noqa: E402
from megatrain.cli_args import fail, parse, run_training  # noqa: E402


def main(argv=None):
    cfg, _, local_rank = parse(argv, description=__doc__)
    try:
        if cfg.model.from_hf:  # continued pretraining: config.json gives the architecture, exactly as finetune's
            from megatrain.interop.hf import resolve_from_hf
            resolve_from_hf(cfg, argv)
        if cfg.data.force_prepare and cfg.data.dataset == "tokens":  # rebuild data.path first (once per launch)
            from megatrain.data.prepare import prepare_corpus
            prepare_corpus(cfg.data, seed=cfg.train.seed)
    except UserError as err:
        fail(err)
    run_training(cfg, local_rank)


if __name__ == "__main__":
    main()
