"""Distill: `python launch/distill.py --config recipes/X.yaml --distill.teacher=DIR [--section.key=value ...]`.

Trains the student (distill.student, e.g. a prune.out dir, or a fresh model from the config) against a frozen
teacher under the normal Trainer, writes <log.dir>/distilled and the comparison table <log.dir>/compression.md.
With --distill.teacher_cache=DIR (written by launch/cache_teacher.py) the teacher's cached top-k targets are read
instead of running it. Runs under `deepspeed`, `torchrun` or plain `python`, under any tp/dp layout and ZeRO
stage; pp>1 needs distill.teacher_cache."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.cli_args import fail, parse  # noqa: E402


def main(argv=None):
    cfg, _, local_rank = parse(argv, description=__doc__)
    from megatrain.compress.passes import run_distill
    try:
        run_distill(cfg, local_rank=local_rank)
    except ValueError as err:
        fail(err)


if __name__ == "__main__":
    main()
