"""The one factory: the plain (unsharded) model of any ModelConfig. Every caller that needs "the model of this
config" — the training tasks, the weight sources, the planner, the compression passes — builds through here, so
an architecture is added in one place (a Transformer family is one spec in registry.py)."""
from __future__ import annotations

from typing import Literal

from torch import nn

from megatrain.config.schema import ModelConfig


def build_model(model_cfg: ModelConfig, *, seed: int = 0, meta: bool = False, image_size: int | None = None,
                stem: Literal["auto", "small", "imagenet"] = "auto") -> nn.Module:
    """``meta``: Transformers only, built on the meta device (materialised later, per rank). ``image_size`` /
    ``stem``: ResNets only — the stem is chosen from the image size (``auto``) or given (a saved model's).
    RNNs are language models or classifiers by ``model.task``. Initialisation draws from a private stream seeded
    by ``seed`` (name-seeded per tensor for Transformers), so building never shifts the caller's RNG."""
    if model_cfg.arch == "resnet":
        from megatrain.models.cnn import build_resnet
        return build_resnet(model_cfg, seed=seed, image_size=image_size, stem=stem)
    if model_cfg.arch in ("lstm", "gru"):
        from megatrain.models.rnn import build_rnn_classifier, build_rnn_lm
        build = build_rnn_lm if model_cfg.task == "language_modeling" else build_rnn_classifier
        return build(model_cfg, model_cfg.vocab_size, seed=seed)
    from megatrain.models.registry import SPECS
    from megatrain.models.transformer import build_transformer
    build = SPECS[model_cfg.hf_family].build if model_cfg.hf_family in SPECS else build_transformer
    return build(model_cfg, seed=seed, meta=meta)
