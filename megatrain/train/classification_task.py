"""Classification: images through a ResNet, token sequences through an LSTM/GRU classifier.

Implements the Task protocol (megatrain/train/task.py). Statistics are sums — loss_sum, count, correct and the
(C, C) confusion matrix — so precision/recall/F1 are exact after the Trainer sums them over micro-batches and
data-parallel ranks.

Images are kept as raw [0, 1] pixels in the dataset; augmentation (training only) and normalisation run batched
on the training device here. Augmentation for a sample is keyed on (train.seed, epoch, pool index), where the
epoch comes from the optimizer step (DeepSpeed's ``global_steps``) and the global batch size, so every rank and
every data-parallel layout draws identical transforms, and a resumed run continues the same sequence.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from megatrain.config.schema import Config
from megatrain.data import images as img
from megatrain.data.augment import PRESETS, augment_batch
from megatrain.train.metrics import classification_metrics, confusion_matrix, mean_loss
from megatrain.errors import UserError

def _is_image(cfg: Config) -> bool:
    if cfg.model.arch == "resnet":
        return True
    if cfg.model.arch in ("lstm", "gru"):
        return False
    raise UserError(f"model.arch={cfg.model.arch} has no classification head; use resnet, lstm or gru")


def load_pool(cfg: Config):
    """All labelled samples of ``data.dataset``: ImageArrays (resnet) or SequenceArrays (lstm/gru)."""
    if _is_image(cfg):
        return img.load_image_arrays(cfg.data.dataset, cfg.data.path, in_channels=cfg.model.in_channels)
    return img.load_sequence_arrays(cfg.data.dataset, cfg.data.path)


def pool_labels(cfg: Config) -> np.ndarray:
    return load_pool(cfg).y


class ClassificationTask:
    def __init__(self, cfg: Config, *, split: tuple[np.ndarray, np.ndarray] | None = None, pool=None):
        """``split`` = (train_idx, val_idx) into the labelled pool (K-fold passes its folds); default: a
        stratified ``data.val_fraction`` split. ``pool`` skips reloading arrays already in memory."""
        self.cfg = cfg
        self.is_image = _is_image(cfg)
        if cfg.model.task != "classification":
            raise UserError(f"ClassificationTask needs model.task=classification (got {cfg.model.task})")
        self.pool = pool if pool is not None else load_pool(cfg)
        labels = self.pool.y
        num_classes = int(labels.max()) + 1 if len(labels) else 0
        if num_classes > cfg.model.num_classes:
            raise UserError(f"model.num_classes={cfg.model.num_classes} but the data has labels up to "
                             f"{num_classes - 1}; set model.num_classes={num_classes}")
        self.num_classes = cfg.model.num_classes
        if split is None:
            split = img.stratified_split(labels, cfg.data.val_fraction, seed=cfg.data.split_seed)
        self.train_idx, self.val_idx = (np.asarray(s, dtype=np.int64) for s in split)
        if len(self.train_idx) == 0:
            raise UserError("the training split is empty; lower data.val_fraction")
        if self.is_image:
            mean, std = img.channel_stats(self.pool.x[self.train_idx])
            self.mean, self.std = torch.from_numpy(mean), torch.from_numpy(std)
            self.augment = PRESETS[cfg.data.dataset] if cfg.data.augment else None
        else:
            if cfg.data.augment:
                raise UserError("data.augment=true is for images; token-sequence classification has no augmentation")
            if cfg.model.vocab_size == 0:
                cfg.model.vocab_size = self.pool.vocab_size
            elif cfg.model.vocab_size < self.pool.vocab_size:
                raise UserError(f"model.vocab_size={cfg.model.vocab_size} but the data has token ids up to "
                                 f"{self.pool.vocab_size - 1}; set model.vocab_size={self.pool.vocab_size} or 0")
            self.augment = None
        self._epoch: int | None = None

    # ---- Task protocol ---------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from megatrain.models.build import build_model
        image_size = int(min(self.pool.x.shape[-2:])) if self.is_image else None
        return build_model(self.cfg.model, seed=self.cfg.train.seed, image_size=image_size)

    def dataset_for(self, indices: np.ndarray):
        """A dataset over pool ``indices`` (the ensemble tool scores members on another config's split)."""
        if self.is_image:
            return img.ImageDataset(self.pool.x, self.pool.y, indices)
        return img.TokenSequenceDataset(self.pool.tokens, self.pool.lengths, self.pool.y, indices)

    def train_dataset(self):
        return self.dataset_for(self.train_idx)

    def val_dataset(self):
        return self.dataset_for(self.val_idx) if len(self.val_idx) else None

    def loss_and_stats(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        logits = self.logits(model, batch).float()  # (B, C)
        labels = batch["label"]  # (B,)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.train.label_smoothing)
        with torch.no_grad():
            # the reported loss is the plain NLL, comparable across label-smoothing settings
            nll_sum = F.cross_entropy(logits, labels, reduction="sum")
            preds = logits.argmax(-1)
            stats = {"loss_sum": nll_sum, "count": torch.tensor(float(labels.numel()), device=logits.device),
                     "correct": (preds == labels).sum().float(),
                     "confusion": confusion_matrix(preds, labels, self.num_classes).float()}
        return loss, stats

    def summarize(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        if float(stats["count"]) == 0:
            return {"loss": float("nan")}
        out = {"loss": mean_loss(stats["loss_sum"], stats["count"])}
        m = classification_metrics(stats["confusion"])
        out.update({k: m[k] for k in ("accuracy", "f1_macro", "precision_macro", "recall_macro")})
        return out

    def items_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["label"].numel())

    # ---- helpers used by the trainer path and the evaluation tools -------------------------------------
    def set_epoch(self, epoch: int | None) -> None:
        """Pin the augmentation epoch (None = derive it from the optimizer step, the default)."""
        self._epoch = epoch

    def epoch_of(self, model: nn.Module) -> int:
        if self._epoch is not None:
            return self._epoch
        steps = int(getattr(model, "global_steps", 0))  # DeepSpeed engine: optimizer steps taken (restored on resume)
        return steps * self.cfg.train.global_batch_size // max(len(self.train_idx), 1)

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, C) for a collated batch; augments image batches only in training mode."""
        if self.is_image:
            x = batch["image"].float()  # (B, C, H, W) in [0, 1]
            if _is_training(model) and self.augment is not None:
                x = augment_batch(x, batch["index"], self.augment, seed=self.cfg.train.seed,
                                  epoch=self.epoch_of(model))
            x = img.normalize(x, self.mean, self.std)
            return model(x.to(_param_dtype(model)))
        ids, lengths = batch["input_ids"], batch["length"]  # (B, T), (B,)
        full = bool((lengths == ids.shape[1]).all())
        return model(ids) if full else model(ids, lengths)  # packing only when rows are padded

    @torch.no_grad()
    def predict_proba(self, model: nn.Module, dataset, *, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax probabilities (N, C) and labels (N,) over a whole dataset, in eval mode, on CPU."""
        from torch.utils.data import default_collate

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        probs, labels = [], []
        for start in range(0, len(dataset), batch_size):
            batch = default_collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            probs.append(self.logits(model, batch).float().softmax(-1).cpu())
            labels.append(batch["label"].cpu())
        model.train(was_training)
        return torch.cat(probs), torch.cat(labels)


def _is_training(model: nn.Module) -> bool:
    # DeepSpeedEngine.eval()/train() switch the wrapped module but leave the engine's own ``training`` flag at
    # True, so the flag of the module that actually runs is the one to trust.
    return getattr(model, "module", model).training


def _param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32
