"""Next-token language modelling on prepared token shards (Transformers and RNN LMs)."""
from __future__ import annotations

import math

import torch
from torch import nn

from megatrain import ops
from megatrain.config.schema import Config
from megatrain.errors import UserError


def read_vocab_size(data_path: str) -> int:
    from megatrain.data.prepare import read_meta
    return int(read_meta(data_path)["vocab_size"])


class LanguageModelingTask:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.tp_group = None  # set by configure_parallel when the LM head is vocab-parallel
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = read_vocab_size(cfg.data.path)

    def configure_parallel(self, dims) -> None:
        self.tp_group = dims.tp_group if dims.tp > 1 else None

    def build_model(self) -> nn.Module:
        if self.cfg.model.is_transformer:
            from megatrain.models.registry import spec_for  # the model spec of the family
            return spec_for(self.cfg.model).build(self.cfg.model, seed=self.cfg.train.seed, meta=True)
        from megatrain.models.rnn import build_rnn_lm  # lstm / gru language models
        torch.manual_seed(self.cfg.train.seed)
        return build_rnn_lm(self.cfg.model, self.cfg.model.vocab_size)

    def train_dataset(self):
        from megatrain.data.dataset import PackedTokenDataset
        return PackedTokenDataset(self.cfg.data.path, "train", self.cfg.seq_len)

    def val_dataset(self):
        """The validation split, or None when prepare held none out (val_fraction=0). A corrupt or
        too-short split is an error, not a silently skipped validation."""
        from megatrain.data.dataset import PackedTokenDataset
        from megatrain.data.prepare import read_meta
        if read_meta(self.cfg.data.path)["splits"].get("val", {}).get("num_tokens", 0) == 0:
            return None
        return PackedTokenDataset(self.cfg.data.path, "val", self.cfg.seq_len)

    def validation_for(self, data_path: str):
        """The validation split of another prepared corpus (continual training tracks forgetting on it)."""
        from megatrain.data.dataset import PackedTokenDataset
        from megatrain.data.prepare import read_meta
        meta = read_meta(data_path)
        if meta["vocab_size"] != self.cfg.model.vocab_size:
            raise UserError(f"eval.old_data={data_path} has vocab_size={meta['vocab_size']}, the model "
                             f"{self.cfg.model.vocab_size}; prepare it with the same tokenizer (data.tokenizer)")
        return PackedTokenDataset(data_path, "val", self.cfg.seq_len)

    def loss_and_stats(self, model, batch):
        logits = model(batch["input_ids"])  # (B, T, V)
        return self.loss_from_logits(logits, batch)

    def loss_from_logits(self, logits: torch.Tensor, batch: dict):
        labels = batch["labels"]  # (B, T)
        flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        count = (flat_labels != -100).sum()
        if self.tp_group is not None:  # logits are (B, T, V/tp): never gather the vocabulary
            from megatrain.ops.cross_entropy import vocab_parallel_cross_entropy
            per_token = vocab_parallel_cross_entropy(flat_logits, flat_labels, self.tp_group, reduction="none",
                                                     vocab_size=self.cfg.model.vocab_size,
                                                     label_smoothing=self.cfg.train.label_smoothing)
            loss = per_token.sum() / count.clamp_min(1)
        else:
            loss = ops.cross_entropy(flat_logits, flat_labels, label_smoothing=self.cfg.train.label_smoothing)
        stats = {"loss_sum": loss.detach().float() * count, "count": count.float()}
        return loss, stats

    def summarize(self, stats):
        loss = (stats["loss_sum"] / stats["count"].clamp_min(1)).item()
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}

    def items_in(self, batch) -> int:
        return batch["input_ids"].numel()
