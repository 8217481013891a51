"""Precompute teacher targets: `python launch/cache_teacher.py --config recipes/X.yaml --distill.teacher=DIR
--distill.teacher_cache=OUT [--distill.cache_topk=32 --distill.cache_samples=N ...]`.

Runs the frozen teacher once over the training samples (the windows the LM dataset yields) and writes, per
position, its top-k token ids, their log-probs at distill.temperature and the tail's log-mass to sharded files
plus a manifest (megatrain/compress/teacher_cache.py). Then `launch/distill.py` with the same
distill.teacher_cache trains from it without running the teacher (also under parallel.pp>1).
Runs under `deepspeed`, `torchrun` or plain `python`; ranks split the shards between them."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.cli_args import run_pass  # noqa: E402


def main(argv=None):
    run_pass(argv, __doc__, "megatrain.compress.passes:run_cache_teacher")


if __name__ == "__main__":
    main()
