"""Pick the Task for a config: language modelling or classification."""
from __future__ import annotations

from megatrain.config.schema import Config
from megatrain.errors import UserError


def make_task(cfg: Config):
    if cfg.model.task == "classification":
        if cfg.model.is_transformer:
            raise UserError("model.task=classification is for resnet/lstm/gru; Transformers train as language models")
        from megatrain.train.classification_task import ClassificationTask
        return ClassificationTask(cfg)
    if cfg.model.arch == "resnet":
        raise UserError("model.arch=resnet needs model.task=classification")
    from megatrain.train.lm_task import LanguageModelingTask
    return LanguageModelingTask(cfg)
