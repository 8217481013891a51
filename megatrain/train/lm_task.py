"""Next-token language modelling on prepared token shards (Transformers and RNN LMs)."""
from __future__ import annotations

import math

import torch
from torch import nn

from megatrain.config.schema import Config
from megatrain.errors import UserError


def read_vocab_size(data_path: str) -> int:
    from megatrain.data.prepared import read_meta
    return int(read_meta(data_path)["vocab_size"])


class LanguageModelingTask:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.tp_group = None  # set by configure_parallel when the LM head is vocab-parallel
        from megatrain.ops.dispatch import policy_from_config
        from megatrain.ops.kernels import Kernels
        self.kernels = Kernels(policy_from_config(cfg.model))  # the loss runs under the run's kernel policy
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = read_vocab_size(cfg.data.path)
        if cfg.train.fused_linear_ce:
            if not cfg.model.is_transformer:
                raise UserError(f"train.fused_linear_ce needs a Transformer (model.arch gpt2 or llama), not "
                                f"{cfg.model.arch}; set train.fused_linear_ce=false")
            if cfg.parallel.pp > 1 or cfg.parallel.zero_stage == 3:
                raise UserError("train.fused_linear_ce needs parallel.pp=1 and parallel.zero_stage<=2 (it reads the "
                                "LM head weight outside the head's forward); set train.fused_linear_ce=false")

    def configure_parallel(self, dims) -> None:
        self.tp_group = dims.tp_group if dims.tp > 1 else None
        if self.cfg.train.fused_linear_ce and dims.tp > 1:
            raise UserError("train.fused_linear_ce needs parallel.tp=1 (with tp>1 the vocab-parallel CE already "
                            "keeps only V/tp logits per rank); set train.fused_linear_ce=false")

    def build_model(self) -> nn.Module:
        from megatrain.models.build import build_model
        return build_model(self.cfg.model, seed=self.cfg.train.seed, meta=self.cfg.model.is_transformer)

    def _dataset(self, data_path: str, split: str, *, vocab_size: int | None, verify_checksums: bool = True):
        """The split as samples: ``data.packing`` (None = documents for SFT data, which has a loss mask in its
        meta.json, stream for plain text) picks PackedTokenDataset (stream) or DocumentPackedDataset."""
        from megatrain.data.dataset import PackedTokenDataset
        from megatrain.data.prepared import read_meta
        d = self.cfg.data
        packing = d.packing or ("documents" if read_meta(data_path).get("loss_mask") else "stream")
        if packing == "stream":
            return PackedTokenDataset(data_path, split, self.cfg.seq_len, vocab_size=vocab_size,
                                      verify_checksums=verify_checksums, train_on_prompt=d.train_on_prompt)
        from megatrain.data.packing import DocumentPackedDataset
        return DocumentPackedDataset(data_path, split, self.cfg.seq_len, packing=packing, vocab_size=vocab_size,
                                     verify_checksums=verify_checksums, train_on_prompt=d.train_on_prompt)

    def train_dataset(self):
        return self._dataset(self.cfg.data.path, "train", vocab_size=self.cfg.model.vocab_size,
                             verify_checksums=self.cfg.data.verify_checksums)

    def val_dataset(self):
        """The validation split, or None when prepare held none out (val_fraction=0). A corrupt or
        too-short split is an error, not a silently skipped validation."""
        from megatrain.data.prepared import read_meta
        meta = read_meta(self.cfg.data.path)
        if meta["splits"].get("val", {}).get("num_tokens", 0) == 0:
            from megatrain.data.prepared import empty_split_holds_tokens
            empty_split_holds_tokens(self.cfg.data.path, meta, "val")  # meta.json edited: one line, not silence
            if (meta.get("config") or {}).get("val_fraction", 0):
                import logging  # an empty val split is said out loud, never a silent "no validation"
                logging.getLogger("megatrain.data").warning(
                    "data.path=%s: the validation split is empty (0 tokens), so this run has no validation; "
                    "add documents or raise data.val_fraction and prepare again", self.cfg.data.path)
            return None
        return self._dataset(self.cfg.data.path, "val", vocab_size=self.cfg.model.vocab_size,
                             verify_checksums=self.cfg.data.verify_checksums)

    def validation_for(self, data_path: str):
        """The validation split of another prepared corpus (continual training tracks forgetting on it), packed
        and masked the way its own meta.json and data.packing / data.train_on_prompt say."""
        from megatrain.data.prepared import read_meta
        meta = read_meta(data_path)
        if meta["vocab_size"] != self.cfg.model.vocab_size:
            raise UserError(f"eval.old_data={data_path} has vocab_size={meta['vocab_size']}, the model "
                             f"{self.cfg.model.vocab_size}; prepare it with the same tokenizer (data.tokenizer)")
        return self._dataset(data_path, "val", vocab_size=None)

    @staticmethod
    def model_inputs(batch: dict) -> dict:
        """The packing fields of a batch the model takes as keywords: ``positions`` and ``segments`` (B, T)."""
        return {k: batch[k] for k in ("positions", "segments") if k in batch}

    @staticmethod
    def loss_terms(batch: dict) -> int:
        """How many label tokens (labels != -100) the batch holds; the trainer normalises the step's loss by the
        sum of these over all micro-batches and data-parallel ranks (``loss_divisor``). Read on the host batch."""
        return int((batch["labels"] != -100).sum())

    def loss_and_stats(self, model, batch):
        if self.cfg.train.fused_linear_ce:
            return self._fused_loss_and_stats(model, batch)
        logits = model(batch["input_ids"], **self.model_inputs(batch))  # (B, T, V)
        return self.loss_from_logits(logits, batch, logits_dead=True)  # nothing reads them after the loss

    def _fused_loss_and_stats(self, model, batch):
        # (B, T, H), through the engine's forward
        hidden = model(batch["input_ids"], return_hidden=True, **self.model_inputs(batch))
        weight = getattr(model, "module", model).head.lm_head.weight  # (V, H); tied: the token table
        labels = batch["labels"].reshape(-1)
        count = (labels != -100).sum()
        loss_sum = self.kernels.fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, labels,
                                                           label_smoothing=self.cfg.train.label_smoothing,
                                                           reduction="sum")
        return self._normalised(loss_sum, count, batch)

    def loss_from_logits(self, logits: torch.Tensor, batch: dict, *, logits_dead: bool = False):
        """Token CE; ``logits_dead``: the caller drops the logits after this (the kernel may overwrite them).

        The loss is the CE summed over this batch's label tokens divided by ``batch["loss_divisor"]`` when the
        trainer set it (the global token count of the step, as each micro-batch's share — docs/training.md, loss
        normalisation), else by this batch's own label count (a plain mean). Statistics are true sums."""
        labels = batch["labels"]  # (B, T)
        flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        count = (flat_labels != -100).sum()
        if self.tp_group is not None:  # logits are (B, T, V/tp): never gather the vocabulary
            per_token = self.kernels.vocab_parallel_cross_entropy(
                flat_logits, flat_labels, self.tp_group, reduction="none", vocab_size=self.cfg.model.vocab_size,
                label_smoothing=self.cfg.train.label_smoothing)
            loss_sum = per_token.sum()
        else:
            loss_sum = self.kernels.cross_entropy(flat_logits, flat_labels, reduction="sum",
                                                  label_smoothing=self.cfg.train.label_smoothing,
                                                  logits_dead=logits_dead)
        return self._normalised(loss_sum, count, batch)

    @staticmethod
    def _normalised(loss_sum: torch.Tensor, count: torch.Tensor, batch: dict):
        divisor = batch.get("loss_divisor")
        loss = loss_sum / (count.clamp_min(1) if divisor is None else divisor)
        return loss, {"loss_sum": loss_sum.detach().float(), "count": count.float()}

    def summarize(self, stats):
        loss = (stats["loss_sum"] / stats["count"].clamp_min(1)).item()
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}

    def items_in(self, batch) -> int:
        return batch["input_ids"].numel()
