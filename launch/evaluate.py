"""Evaluate: K-fold CV, hyper-parameter search, ensembles, or one checkpoint — chosen by config fields.

  python launch/evaluate.py --config recipes/cnn_digits.yaml --eval.kfold=5 --log.dir=runs/cv   # K-fold CV
  python launch/evaluate.py --config recipes/search_cnn_digits.yaml                             # search.space
  python launch/evaluate.py --config recipes/cnn_digits.yaml --eval.ensemble='[runs/a,runs/b]'  # ensemble
  python launch/evaluate.py --config recipes/ensemble_digits.yaml     # train 3 members, then ensemble them
  python launch/evaluate.py --config recipes/cnn_digits.yaml --checkpoint.resume=runs/a         # one checkpoint
  python launch/evaluate.py --checkpoint.resume=runs/tiny --data.path=held_out.jsonl --log.dir=runs/ev  # an LM

Precedence: search.space, then eval.kfold > 0, then eval.ensemble / eval.ensemble_members, else the checkpoint in checkpoint.resume
(or <log.dir>/checkpoints). For language models checkpoint.resume may also be a saved model dir or a Hugging Face
dir, and --data.path a prepared data dir or a raw .txt/.jsonl file (default: the checkpoint's own validation split);
loss, perplexity and tokens go to <log.dir>/eval.json (docs/finetuning.md). Runs under `deepspeed`/`torchrun` too; only rank 0 writes tables and plots."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.errors import UserError  # noqa: E402
from megatrain.cli_args import fail, parse  # noqa: E402


def main(argv=None):
    cfg, _, local_rank = parse(argv, description=__doc__)
    from megatrain.distributed.env import is_main_process, shutdown_distributed
    from megatrain.eval.plots import plot_curves

    log = print if is_main_process() else (lambda s: None)
    try:
        if cfg.search.space:
            from megatrain.eval.search import run_search
            ranked = run_search(cfg, log=log)
            if is_main_process():
                plot_curves([os.path.join(cfg.log.dir, f"trial_{r['trial']:03d}") for r in ranked],
                            os.path.join(cfg.log.dir, "curves.png"))
        elif cfg.eval.kfold:
            from megatrain.eval.kfold import run_kfold
            run_kfold(cfg, log=log)
            if is_main_process():
                plot_curves([os.path.join(cfg.log.dir, f"fold_{i}") for i in range(cfg.eval.kfold)],
                            os.path.join(cfg.log.dir, "curves.png"))
        elif cfg.eval.ensemble or cfg.eval.ensemble_members:
            from megatrain.eval.ensemble import run_ensemble, train_members
            paths = train_members(cfg, log=log) if cfg.eval.ensemble_members else None
            run_ensemble(cfg, paths, log=log)
        else:
            from megatrain.eval.ensemble import evaluate_checkpoint
            path = cfg.checkpoint.resume if cfg.checkpoint.resume not in ("none", "auto") else \
                (cfg.checkpoint.dir or os.path.join(cfg.log.dir, "checkpoints"))
            evaluate_checkpoint(cfg, path, log=log)
    except UserError as err:
        fail(err)
    shutdown_distributed()


if __name__ == "__main__":
    main()
