"""Knowledge distillation as a Task: the student trains under the normal Trainer (DeepSpeed, ZeRO, tp) while a
frozen teacher supplies soft targets.

loss = α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α)·CE(s, labels) [+ β·MSE(proj(h_s), h_t)]

- The teacher (a megatrain checkpoint, a pruned-model dir or a local Hugging Face dir) lives in the task, not
  in the model DeepSpeed wraps: it has no optimizer state, no gradients, stays in eval mode, optionally bf16.
- Under tensor parallelism the teacher is sharded with the same tp group as the student, so both produce
  vocab-sharded logits and the KL is computed with ``vocab_parallel_kl`` (full logits are never gathered).
- Hidden-state MSE (distill.hidden_mse > 0) compares the last block's output; when the widths differ the
  student gets a learned projection ``distill_proj`` (trained with it; dropped when the student is exported).
Pipeline parallelism is not supported (the loss is computed inside DeepSpeed's pipeline, without the teacher).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megatrain.compress.kl import distill_loss, kl_per_token, vocab_parallel_kl
from megatrain.config.schema import Config, ModelConfig
from megatrain.train.lm_task import LanguageModelingTask


def _capture_last_block(model: nn.Module, store: dict, key: str):
    def hook(_mod, _args, out):
        store[key] = out  # (B, T, H)
    return model.layers[-1].register_forward_hook(hook)


class DistillationTask:
    def __init__(self, cfg: Config, *, teacher: tuple[nn.Module, ModelConfig] | None = None,
                 student: nn.Module | None = None):
        """``teacher``/``student`` may be passed as built modules (tests, the prune→distill driver); else they
        come from distill.teacher / distill.student."""
        self.cfg, self.d = cfg, cfg.distill
        self.lm = LanguageModelingTask(cfg)
        if teacher is None:
            if not self.d.teacher:
                raise ValueError("distill.teacher is not set; point it at a megatrain checkpoint, a pruned model "
                                 "dir or a local Hugging Face dir")
            from megatrain.compress.io import load_model
            teacher = load_model(self.d.teacher)
        self.teacher, self.teacher_cfg = teacher
        if self.teacher_cfg.vocab_size != cfg.model.vocab_size:
            raise ValueError(f"distill.teacher has vocab_size={self.teacher_cfg.vocab_size} but the student's "
                             f"model.vocab_size={cfg.model.vocab_size}; the KL needs one vocabulary - use a teacher "
                             "trained with the student's tokenizer")
        if self.d.hidden_mse and cfg.parallel.sequence_parallel:
            raise ValueError("distill.hidden_mse with parallel.sequence_parallel=true is not supported (hidden "
                             "states are sequence-sharded); set hidden_mse=0 or turn sequence_parallel off")
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        if self.d.teacher_bf16:
            self.teacher.to(torch.bfloat16)
        self._student = student
        self.tp_group = None
        self._hidden: dict[str, torch.Tensor] = {}
        self._hooks = [_capture_last_block(self.teacher, self._hidden, "teacher")] if self.d.hidden_mse else []

    # ---- Task protocol --------------------------------------------------------------------------------
    def configure_parallel(self, dims) -> None:
        if dims.pp > 1:
            raise ValueError("distillation with parallel.pp>1 is not supported (the pipeline computes the loss "
                             "without the teacher); use tp and ZeRO instead")
        self.lm.configure_parallel(dims)
        self.tp_group = self.lm.tp_group
        if dims.tp > 1:  # shard the teacher exactly like the student: its logits come out vocab-sharded too
            from megatrain.parallelize.tensor_parallel import apply_tensor_parallel
            tcfg = self.cfg.model_copy(update={"model": self.teacher_cfg})
            if self.teacher_cfg.num_heads % dims.tp or self.teacher_cfg.kv_heads % dims.tp \
                    or self.teacher_cfg.ffn_size % dims.tp:
                raise ValueError(f"distill.teacher: heads/kv heads/MLP width ({self.teacher_cfg.num_heads}/"
                                 f"{self.teacher_cfg.kv_heads}/{self.teacher_cfg.ffn_size}) do not divide by "
                                 f"parallel.tp={dims.tp}; choose tp dividing the teacher's sizes")
            apply_tensor_parallel(self.teacher, tcfg, dims)

    def build_model(self) -> nn.Module:
        if self._student is not None:
            model = self._student
        elif self.d.student:
            from megatrain.compress.io import load_model
            model, student_cfg = load_model(self.d.student)
            if student_cfg != self.cfg.model:
                raise ValueError(f"distill.student={self.d.student} has a different model section than the config; "
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
        return self.lm.train_dataset()

    def val_dataset(self):
        return self.lm.val_dataset()

    def teacher_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        dev = input_ids.device
        if next(self.teacher.parameters()).device != dev:
            self.teacher.to(dev)
        with torch.no_grad():
            return self.teacher(input_ids)  # (B, T, V) or (B, T, V/tp)

    def loss_and_stats(self, model, batch):
        ids, labels = batch["input_ids"], batch["labels"]
        s_logits = model(ids)  # (B, T, V[/tp])
        t_logits = self.teacher_logits(ids)
        ce, stats = self.lm.loss_from_logits(s_logits, batch)
        flat_s, flat_t = s_logits.reshape(-1, s_logits.shape[-1]), t_logits.reshape(-1, t_logits.shape[-1])
        mask = (labels.reshape(-1) != -100).float()  # (N,)
        T = self.d.temperature
        if self.tp_group is not None:
            kl_tok = vocab_parallel_kl(flat_s, flat_t, group=self.tp_group, vocab_size=self.cfg.model.vocab_size,
                                       temperature=T)
        else:
            kl_tok = kl_per_token(flat_s, flat_t, temperature=T)
        count = stats["count"]
        kl = (kl_tok * mask).sum() / count.clamp_min(1)
        loss = distill_loss(kl, ce, alpha=self.d.alpha, temperature=T)
        if self.d.hidden_mse:
            hs, ht = self._hidden.pop("student"), self._hidden.pop("teacher").float()
            proj = getattr(_unwrap(model), "distill_proj", None)
            hs = proj(hs) if proj is not None else hs
            loss = loss + self.d.hidden_mse * torch.nn.functional.mse_loss(hs.float(), ht)
        stats = {"loss_sum": loss.detach().float() * count, "count": count, "ce_sum": stats["loss_sum"],
                 "kl_sum": kl.detach().float() * count}
        return loss, stats

    def summarize(self, stats):
        n = stats["count"].clamp_min(1)
        ce = (stats["ce_sum"] / n).item()
        return {"loss": (stats["loss_sum"] / n).item(), "ce": ce, "ppl": math.exp(min(ce, 50.0)),
                "kl": (stats["kl_sum"] / n).item()}

    def items_in(self, batch) -> int:
        return batch["input_ids"].numel()


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # the DeepSpeed engine wraps the student


def student_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The student's own tensors (without the distillation projection), for export."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("distill_proj.")}
