"""Compression passes: structured pruning (importance → a smaller dense model) and knowledge distillation.

Public entry points: ``passes.run_prune`` / ``passes.run_distill`` (what launch/prune.py and launch/distill.py
run), ``prune.prune_model`` + ``importance.compute_scores`` (the pass on a plain model), ``distill.DistillationTask``,
``kl.kl_per_token`` / ``kl.vocab_parallel_kl``, ``io.load_model`` / ``io.save_model``. See docs/compression.md.
"""
