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

from megatrain.cli_args import fail, parse  # noqa: E402


def main(argv=None):
    cfg, _, local_rank = parse(argv, description=__doc__)
    from megatrain.compress.passes import run_cache_teacher
    try:
        run_cache_teacher(cfg, local_rank=local_rank)
    except ValueError as err:
        fail(err)


if __name__ == "__main__":
    main()
