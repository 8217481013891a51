"""Knowledge distillation as a Task: the student trains under the normal Trainer (DeepSpeed, ZeRO, tp) while a
frozen teacher supplies soft targets.

loss = α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α)·CE(s, labels) [+ β·MSE(proj(h_s), h_t)]

- The teacher (a megatrain checkpoint, a pruned-model dir or a local Hugging Face dir) lives in the task, not
  in the model DeepSpeed wraps: it has no optimizer state, no gradients, stays in eval mode, optionally bf16.
- Under tensor parallelism the teacher is sharded with the same tp group as the student, so both produce
  vocab-sharded logits and the KL is computed with ``vocab_parallel_kl`` (full logits are never gathered).
- Hidden-state MSE (distill.hidden_mse > 0) compares the last block's output; when the widths differ the
  student gets a learned projection ``distill_proj`` (trained with it; dropped when the student is exported).
- From a teacher cache (distill.teacher_cache, written by launch/cache_teacher.py) no teacher runs: each training
  item carries the teacher's top-k log-probs and tail mass, and the KL is ``sparse_kl`` (top-k + a tail bucket).
  The targets then travel with the batch, so they also reach the last stage of a pipeline (pp > 1) as a tuple of
  labels. A live teacher cannot run there (DeepSpeed's pipeline computes the loss on the last stage only).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megatrain.compress.kl import distill_loss, kl_per_token, vocab_parallel_kl
from megatrain.compress.sparse_kl import sparse_kl
from megatrain.config.schema import Config, ModelConfig
from megatrain.train.lm_task import LanguageModelingTask
from megatrain.errors import UserError


PIPELINE_LABELS = ("labels", "teacher_ids", "teacher_logp", "teacher_tail")


def _capture_last_block(model: nn.Module, store: dict, key: str):
    def hook(_mod, _args, out):
        store[key] = out  # (B, T, H)
    return model.layers[-1].register_forward_hook(hook)


class DistillationTask:
    def __init__(self, cfg: Config, *, teacher: tuple[nn.Module, ModelConfig] | None = None,
                 student: nn.Module | None = None):
        """``teacher``/``student`` may be passed as built modules (tests, the prune→distill driver); else they
        come from distill.teacher / distill.student. With distill.teacher_cache the teacher is not run; a
        teacher given as well is only checked against the one the cache was computed from."""
        self.cfg, self.d = cfg, cfg.distill
        self.lm = LanguageModelingTask(cfg)
        self.cache = self._open_cache(teacher) if self.d.teacher_cache else None
        self.teacher, self.teacher_cfg = None, None
        self._student = student
        self.tp_group = None
        self._hidden: dict[str, torch.Tensor] = {}
        self._hooks = []
        if self.cache is not None:
            return
        if teacher is None:
            if not self.d.teacher:
                raise UserError("distill.teacher is not set; point it at a megatrain checkpoint, a pruned model "
                                 "dir or a local Hugging Face dir (or set distill.teacher_cache)")
            from megatrain.weights.sources import load_model
            teacher = load_model(self.d.teacher)
        self.teacher, self.teacher_cfg = teacher
        if self.teacher_cfg.vocab_size != cfg.model.vocab_size:
            raise UserError(f"distill.teacher has vocab_size={self.teacher_cfg.vocab_size} but the student's "
                             f"model.vocab_size={cfg.model.vocab_size}; the KL needs one vocabulary - use a teacher "
                             "trained with the student's tokenizer")
        if self.d.hidden_mse and cfg.parallel.sequence_parallel:
            raise UserError("distill.hidden_mse with parallel.sequence_parallel=true is not supported (hidden "
                             "states are sequence-sharded); set hidden_mse=0 or turn sequence_parallel off")
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        if self.d.teacher_bf16:
            self.teacher.to(torch.bfloat16)
        if self.d.hidden_mse:
            self._hooks.append(_capture_last_block(self.teacher, self._hidden, "teacher"))

    def _open_cache(self, teacher):
        from megatrain.compress.teacher_cache import TeacherCache, dataset_identity, tensor_crc
        if self.d.hidden_mse:
            raise UserError("distill.hidden_mse needs the live teacher's hidden states, which distill.teacher_cache "
                             "does not hold; set distill.hidden_mse=0 or unset distill.teacher_cache")
        cache = TeacherCache(self.d.teacher_cache)
        data = self.lm.train_dataset()
        cache.check(vocab_size=self.cfg.model.vocab_size, seq_len=self.cfg.seq_len, temperature=self.d.temperature,
                    k=self.d.cache_topk, data=dataset_identity(data, min(len(cache), len(data))),
                    teacher_crc=tensor_crc(teacher[0]) if teacher is not None else None)
        return cache

    # ---- Task protocol --------------------------------------------------------------------------------
    def configure_parallel(self, dims) -> None:
        if dims.pp > 1 and self.cache is None:
            raise UserError("distillation from a live teacher with parallel.pp>1 is not supported (the pipeline "
                             "computes the loss on its last stage, without the teacher); precompute the teacher "
                             "with launch/cache_teacher.py and set distill.teacher_cache, or use tp and ZeRO")
        if dims.pp > 1 and self.d.hidden_mse:
            raise UserError("distill.hidden_mse is not supported with parallel.pp>1; set hidden_mse=0")
        self.lm.configure_parallel(dims)
        self.tp_group = self.lm.tp_group
        if dims.tp > 1 and self.teacher is not None:  # shard the teacher like the student: vocab-sharded logits
            from megatrain.parallelize.tensor_parallel import apply_tensor_parallel
            tcfg = self.cfg.model_copy(update={"model": self.teacher_cfg})
            if self.teacher_cfg.num_heads % dims.tp or self.teacher_cfg.kv_heads % dims.tp \
                    or self.teacher_cfg.ffn_size % dims.tp:
                raise UserError(f"distill.teacher: heads/kv heads/MLP width ({self.teacher_cfg.num_heads}/"
                                 f"{self.teacher_cfg.kv_heads}/{self.teacher_cfg.ffn_size}) do not divide by "
                                 f"parallel.tp={dims.tp}; choose tp dividing the teacher's sizes")
            apply_tensor_parallel(self.teacher, tcfg, dims)
        if self.d.teacher_zero3 and self.teacher is not None:
            self.teacher = _zero3_inference(self.teacher, dims, bf16=self.d.teacher_bf16)

    def build_model(self) -> nn.Module:
        if self._student is not None:
            model = self._student
        elif self.d.student:
            from megatrain.weights.sources import load_model
            model, student_cfg = load_model(self.d.student)
            if student_cfg != self.cfg.model:
                raise UserError(f"distill.student={self.d.student} has a different model section than the config; "
                                 "take model from the student's config.yaml (launch/distill.py does)")
        else:
            model = self.lm.build_model()
        if self.d.hidden_mse:
            hs, ht = self.cfg.model.hidden_size, self.teacher_cfg.hidden_size
            if hs != ht:
                model.distill_proj = nn.Linear(hs, ht, bias=False)  # learned: student width -> teacher width
                nn.init.normal_(model.distill_proj.weight, std=1 / math.sqrt(hs))
            self._hooks.append(_capture_last_block(model, self._hidden, "student"))
        return model

    def train_dataset(self):
        if self.cache is None:
            return self.lm.train_dataset()
        from megatrain.compress.teacher_cache import CachedTargetsDataset
        return CachedTargetsDataset(self.lm.train_dataset(), self.cache)

    def val_dataset(self):
        return self.lm.val_dataset()  # no cached targets: validation with a cache reports hard-label CE

    def teacher_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        dev = input_ids.device
        if not self.d.teacher_zero3 and next(self.teacher.parameters()).device != dev:  # DeepSpeed placed a ZeRO-3 one
            self.teacher.to(dev)
        with torch.no_grad():
            return self.teacher(input_ids)  # (B, T, V) or (B, T, V/tp)

    def _kl_per_token(self, s_logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """(B, T, V[/tp]) student logits -> (B·T,) KL to the teacher (live, or its cached top-k)."""
        flat_s = s_logits.reshape(-1, s_logits.shape[-1])  # (N, V[/tp])
        T, vocab = self.d.temperature, self.cfg.model.vocab_size
        if self.cache is not None:
            k = batch["teacher_ids"].shape[-1]
            return sparse_kl(flat_s, batch["teacher_ids"].reshape(-1, k), batch["teacher_logp"].reshape(-1, k),
                             batch["teacher_tail"].reshape(-1), temperature=T, vocab_size=vocab, group=self.tp_group)
        t_logits = self.teacher_logits(batch["input_ids"])
        flat_t = t_logits.reshape(-1, t_logits.shape[-1])
        if self.tp_group is not None:
            return vocab_parallel_kl(flat_s, flat_t, group=self.tp_group, vocab_size=vocab, temperature=T)
        return kl_per_token(flat_s, flat_t, temperature=T)

    def _loss_from_logits(self, model, s_logits: torch.Tensor, batch: dict):
        ce, stats = self.lm.loss_from_logits(s_logits, batch)
        count = stats["count"]
        if self.cache is not None and "teacher_ids" not in batch:  # validation data has no cached targets
            return ce, {"loss_sum": stats["loss_sum"], "count": count, "ce_sum": stats["loss_sum"]}
        mask = (batch["labels"].reshape(-1) != -100).float()  # (N,)
        kl = (self._kl_per_token(s_logits, batch) * mask).sum() / count.clamp_min(1)
        loss = distill_loss(kl, ce, alpha=self.d.alpha, temperature=self.d.temperature)
        if self.d.hidden_mse:
            hs, ht = self._hidden.pop("student"), self._hidden.pop("teacher").float()
            proj = getattr(_unwrap(model), "distill_proj", None)
            hs = proj(hs) if proj is not None else hs
            loss = loss + self.d.hidden_mse * torch.nn.functional.mse_loss(hs.float(), ht)
        stats = {"loss_sum": loss.detach().float() * count, "count": count, "ce_sum": stats["loss_sum"],
                 "kl_sum": kl.detach().float() * count}
        return loss, stats

    def loss_and_stats(self, model, batch):
        s_logits = model(batch["input_ids"])  # (B, T, V[/tp])
        return self._loss_from_logits(model, s_logits, batch)

    # ---- pipeline (pp > 1): the cached targets ride to the last stage as labels ------------------------
    def pipeline_labels(self, batch: dict):
        """What DeepSpeed's pipeline hands the loss on the last stage: the labels, and with a cache the teacher's
        targets as well (a tuple of tensors, which the pipeline engine moves to the device as they are)."""
        if self.cache is None or "teacher_ids" not in batch:
            return batch["labels"]
        return tuple(batch[key] for key in PIPELINE_LABELS)

    def pipeline_loss(self, logits: torch.Tensor, labels) -> torch.Tensor:
        batch = {"labels": labels} if torch.is_tensor(labels) else dict(zip(PIPELINE_LABELS, labels))
        return self._loss_from_logits(None, logits, batch)[0]

    def summarize(self, stats):
        # Under pp only the loss comes back from the pipeline; validation from a cache has no KL.
        n = stats["count"].clamp_min(1)
        out = {"loss": (stats["loss_sum"] / n).item()}
        if "ce_sum" in stats:
            out["ce"] = (stats["ce_sum"] / n).item()
            out["ppl"] = math.exp(min(out["ce"], 50.0))
        if "kl_sum" in stats:
            out["kl"] = (stats["kl_sum"] / n).item()
        return out

    def items_in(self, batch) -> int:
        return batch["input_ids"].numel()


def _zero3_inference(teacher: nn.Module, dims, *, bf16: bool) -> nn.Module:
    """The teacher as a DeepSpeed ZeRO-3 engine without an optimizer: its weights are partitioned over the
    data-parallel group and each module's are gathered just for its forward. Every dp rank must then run the
    same number of teacher forwards, which training (one per micro-batch) and Trainer.evaluate guarantee."""
    import deepspeed

    from megatrain.distributed.dims import DeepSpeedMPU
    config = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9, "zero_optimization": {"stage": 3},
              "bf16": {"enabled": bf16}}
    engine = deepspeed.initialize(model=teacher, config=config, mpu=DeepSpeedMPU(dims))[0]
    engine.module.eval()
    return engine


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # the DeepSpeed engine wraps the student


def student_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The student's own tensors (without the distillation projection), for export."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("distill_proj.")}
