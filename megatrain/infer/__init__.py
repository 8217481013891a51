"""Inference: one loader for every kind of trained model (load.py), sampling with the KV cache (generate.py),
chat rendering of prompts (chat.py), and the held-out language-model loss (lm_eval.py)."""
