"""Distill: `python launch/distill.py --config recipes/X.yaml --distill.teacher=DIR [--section.key=value ...]`.

Trains the student (distill.student, e.g. a prune.out dir, or a fresh model from the config) against a frozen
teacher under the normal Trainer, writes <log.dir>/distilled and the comparison table <log.dir>/compression.md.
With --distill.teacher_cache=DIR (written by launch/cache_teacher.py) the teacher's cached top-k targets are read
instead of running it. Runs under `deepspeed`, `torchrun` or plain `python`, under any tp/dp layout and ZeRO
stage; pp>1 needs distill.teacher_cache."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.cli_args import run_pass  # noqa: E402


def main(argv=None):
    run_pass(argv, __doc__, "megatrain.compress.passes:run_distill")


if __name__ == "__main__":
    main()
