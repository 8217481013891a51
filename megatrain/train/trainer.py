"""Trainer: the training loop on DeepSpeed's engine (ZeRO, mixed precision, accumulation, clipping).

megatrain owns what DeepSpeed does not: the task (model + data + loss), the deterministic data position,
per-step RNG, validation, logging and checkpoint bookkeeping. One step = ``grad_accum`` micro-batches per
data-parallel rank; DeepSpeed steps the optimizer and scheduler at the accumulation boundary.
"""
from __future__ import annotations

import os
import time
import zlib

import torch
from torch.utils.data import default_collate

from megatrain.config import Config, to_deepspeed
from megatrain.data.sampler import eval_batch_count
from megatrain.distributed import comm_counter
from megatrain.distributed.env import device as current_device
from megatrain.distributed.bootstrap import Launch, bootstrap
from megatrain.distributed.watchdog import HangWatchdog
from megatrain.fsutil import atomic_write_text
from megatrain.train.logging import RunLogger
from megatrain.train.regularization import param_groups, penalty
from megatrain.train.schedules import lr_multiplier
from megatrain.errors import UserError
from megatrain.distributed import host_collectives as hc


def step_seed(seed: int, step: int, dp_rank: int) -> int:
    """RNG seed for (step, data-parallel rank): resume restores dropout/augmentation RNG exactly without
    saving it, and tensor/pipeline peers (same dp rank) draw the same masks for their replicated regions."""
    return zlib.crc32(f"{seed}/{step}/{dp_rank}".encode())


class Trainer:
    def __init__(self, cfg: Config, task=None, *, local_rank: int | None = None, launch: Launch | None = None):
        """``launch``: the launcher's bootstrap (layout checked, preflight run, process groups made); without it
        the Trainer bootstraps itself, without a memory preflight (library use: K-fold, search, passes)."""
        self.cfg = cfg
        if cfg.checkpoint.export_hf:  # a non-empty target is refused now, not after the training it would end
            from megatrain.interop.export import check_export_target
            check_export_target(cfg.checkpoint.export_hf, overwrite=cfg.checkpoint.export_overwrite)
        if cfg.checkpoint.export_peft:
            from megatrain.interop.export import check_export_target
            check_export_target(cfg.checkpoint.export_peft, overwrite=cfg.checkpoint.export_overwrite,
                                field="checkpoint.export_peft")
        launch = launch or bootstrap(cfg, local_rank)
        self.rank, self.world = launch.rank, launch.world
        self.layout, self.dims = launch.layout, launch.dims
        from megatrain.train.guards import RunGuards
        self.guards = RunGuards(cfg, rank=self.rank)  # signals are caught from here on
        self.watchdog = HangWatchdog(cfg.log.hang_report_s, rank=self.rank, where=f"of {self.world}",
                                     log_dir=cfg.log.dir)
        try:
            self.guards.take_lock(run_dirs(cfg))
            with self.watchdog.phase("setup (model build, deepspeed.initialize, weights, resume)"):
                self._setup(task)
        except BaseException:
            self.watchdog.close()
            self.guards.close()
            raise

    def _setup(self, task) -> None:
        cfg = self.cfg
        from megatrain.distributed.dims import DeepSpeedMPU
        self.watchdog.where = f"tp {self.dims.tp_rank} pp {self.dims.pp_rank} dp {self.dims.dp_rank}"
        if task is None:
            from megatrain.train.tasks import make_task
            task = make_task(cfg)
        self.task = task
        if hasattr(task, "configure_parallel"):
            task.configure_parallel(self.dims)
        self.device = current_device()
        self._check_precision()
        if (cfg.train.l1 or cfg.train.l2) and cfg.parallel.zero_stage == 3:
            raise UserError("train.l1/l2 penalties need whole parameters; with parallel.zero_stage=3 use "
                             "train.weight_decay instead, or zero_stage<=2")
        self.ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.log.dir, "checkpoints")
        self.resume = self._open_resume()
        if cfg.train.nonfinite == "rollback" and cfg.parallel.zero_stage == 3:
            raise UserError("train.nonfinite=rollback reloads parameters in place, which ZeRO-3 partitions; use "
                            "parallel.zero_stage<=2 or train.nonfinite=skip|stop")

        from megatrain.parallelize import parallelize
        if (cfg.train.l1 or cfg.train.l2) and self.layout.pp > 1:
            raise UserError("train.l1/l2 penalties are not supported with parallel.pp>1 (the loss is computed "
                             "inside the pipeline); use train.weight_decay")
        self.pipelined = self.layout.pp > 1
        model = parallelize(task.build_model(), cfg, self.dims, loss_fn=self._pipeline_loss,
                            source=self._weights_source(), device=self.device)
        self.model_for_penalty = model
        # DeepSpeed takes the groups from a PipelineModule's own grid; otherwise from our mpu.
        mpu = None if self.pipelined else DeepSpeedMPU(self.dims)
        self.engine, self.optimizer, self.scheduler = self._deepspeed(model, mpu)
        self.train_data = task.train_dataset()
        self.val_data = task.val_dataset()
        self.old_val_data = self._old_validation()
        from megatrain.data.sampler import GlobalBatchSampler
        self.sampler = GlobalBatchSampler(len(self.train_data), cfg.train.global_batch_size, cfg.train.seed)
        self.step = 0
        self.resumed_from: str | None = None
        self.skipped_batches: set[int] = set()  # steps whose batch a rollback skips (saved with checkpoints)
        self.last_good: str | None = None
        self.preempted: str | None = None
        self._maybe_resume()
        self.last_good = self.resumed_from

    # ---- setup -------------------------------------------------------------------------------------
    def _check_precision(self) -> None:
        if self.device.type == "cpu" and self.cfg.train.precision == "fp16":
            raise UserError("train.precision=fp16 is not supported on CPU (no fp16 kernels); use bf16 or fp32")

    def _deepspeed(self, model, mpu):
        import deepspeed
        from megatrain.ops import make_adamw
        from megatrain.ops.dispatch import policy_from_config

        t = self.cfg.train
        self._check_something_trains(model)
        groups = param_groups(model, t.weight_decay)  # trainable parameters only: frozen ones get no optimizer state
        if t.optimizer == "adamw":
            opt = make_adamw(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay,
                             offload=self.cfg.parallel.offload_optimizer == "cpu",
                             policy=policy_from_config(self.cfg.model))
        else:
            opt = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(t))
        ds_config = to_deepspeed(self.cfg, self.layout)
        engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                     config=ds_config, mpu=mpu)
        self.guards.attach(engine)  # a step with non-finite gradients is never applied
        return engine, opt, sched

    def _check_something_trains(self, model) -> None:
        """Every rank must hold a trainable parameter (DeepSpeed cannot build an optimizer over none): with
        model.lora / train.freeze a pipeline stage can end up fully frozen. All ranks agree before raising."""
        idle = torch.tensor([0.0 if any(p.requires_grad for p in model.parameters()) else 1.0])
        hc.all_reduce(idle, op="max")
        if idle.item():
            raise UserError(f"a pipeline stage has no trainable parameter (train.freeze={self.cfg.train.freeze}, "
                            f"model.lora.rank={self.cfg.model.lora.rank} froze all of its layers); freeze fewer "
                            "layers or use a smaller parallel.pp")

    def _old_validation(self):
        """eval.old_data: the validation split of the data a continued run was first trained on."""
        old = self.cfg.eval.old_data
        if not old:
            return None
        if not hasattr(self.task, "validation_for"):
            raise UserError(f"eval.old_data is supported for language modelling; model.task={self.cfg.model.task}")
        return self.task.validation_for(old)

    def _open_resume(self):
        from megatrain.checkpoint.layout_free import open_resume
        from megatrain.checkpoint.store import resolve_resume
        step_dir = resolve_resume(self.cfg.checkpoint.resume, self.ckpt_dir)
        return open_resume(step_dir, self.cfg.model) if step_dir else None

    def _weights_source(self):
        """Where parameters come from: the checkpoint being resumed, a saved model (model.init_from), a Hugging
        Face directory, or init."""
        if self.resume is not None:
            return self.resume.model
        if self.cfg.model.init_from:
            from megatrain.weights import init_source
            return init_source(self.cfg.model)
        if self.cfg.model.from_hf:
            from megatrain.interop.hf import HFSource
            return HFSource(self.cfg.model.from_hf, self.cfg.model)
        return None

    def _maybe_resume(self) -> None:
        cfg, res = self.cfg.checkpoint, self.resume
        if res is None:
            return
        manifest = res.manifest
        saved_opt = manifest.get("config", {}).get("train", {}).get("optimizer", self.cfg.train.optimizer)
        if not cfg.reset_optimizer and saved_opt != self.cfg.train.optimizer:
            raise UserError(f"checkpoint {res.step_dir} holds train.optimizer={saved_opt} state but the config has "
                            f"{self.cfg.train.optimizer}; keep train.optimizer={saved_opt}, or set "
                            "checkpoint.reset_optimizer=true to start a fresh optimizer")
        if not cfg.reset_optimizer and manifest.get("has_optimizer", True):
            from megatrain.checkpoint.engine_state import load_optimizer_state
            load_optimizer_state(self.engine, self.dims, res, step=int(manifest["optimizer_step"]))
        self.step = 0 if cfg.reset_schedule else int(manifest["step"])
        gbs = manifest.get("layout", {}).get("global_batch_size", self.layout.global_batch_size)
        if not cfg.reset_schedule and gbs != self.layout.global_batch_size:
            raise UserError(f"checkpoint was trained with train.global_batch_size={gbs}; resuming with "
                             f"{self.layout.global_batch_size} would move the data position. Keep it, or set "
                             "checkpoint.reset_schedule=true to start a new schedule (continual training)")
        # Recompute the LR from *this* run's schedule (max_steps may have grown): the restored optimizer
        # carries no LR. reset_schedule restarts it (continual training).
        self.scheduler.last_epoch = self.step - 1
        self.scheduler.step()
        self.resumed_from = res.step_dir
        self.skipped_batches = set(manifest.get("skipped_batches", []))

    def _pipeline_loss(self, logits, labels):
        if hasattr(self.task, "pipeline_loss"):  # labels as the task's pipeline_labels gave them (maybe a tuple)
            return self.task.pipeline_loss(logits, labels)
        if isinstance(labels, (tuple, list)):  # (labels, loss_divisor): the step's normaliser rides along
            labels, divisor = labels
            return self.task.loss_from_logits(logits, {"labels": labels, "loss_divisor": divisor})[0]
        return self.task.loss_from_logits(logits, {"labels": labels})[0]

    # ---- data --------------------------------------------------------------------------------------
    def _micro_batch(self, indices: list[int], dataset) -> dict:
        return self._to_device(default_collate([dataset[i] for i in indices]))

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _step_batches(self, indices: list[int], dataset) -> tuple[list[dict], float | None]:
        """This rank's ``grad_accum`` micro-batches of the step, on the device, and the step's global loss-term
        count (None when the task does not count its loss terms).

        Loss normalisation: the step's loss is the mean over *every* label token of the global batch, not a mean
        of per-micro-batch means (masked SFT micro-batches hold different token counts). Each micro-batch gets
        ``loss_divisor`` = N / (grad_accum · dp), N the label tokens of the whole step summed over dp, counted on
        the host batches before any forward; its loss is its CE sum / loss_divisor, so DeepSpeed's averaging
        over accumulation (÷ grad_accum) and over dp (÷ dp) leaves Σ CE / N, under any layout."""
        from megatrain.data.sampler import rank_slice
        lay, dims = self.layout, self.dims
        host = [default_collate([dataset[i] for i in rank_slice(indices, dp_rank=dims.dp_rank, dp_size=dims.dp,
                                                                 micro_batch_size=lay.micro_batch_size,
                                                                 micro_step=micro)])
                for micro in range(lay.grad_accum)]
        total = None
        if hasattr(self.task, "loss_terms"):
            count = torch.tensor([float(sum(self.task.loss_terms(b) for b in host))], dtype=torch.float64)
            hc.all_reduce(count, group=dims.dp_group)  # over dp only: tp/pp peers hold the same rows
            total = float(count.item())
        batches = [self._to_device(b) for b in host]
        if total is not None:
            divisor = max(total, 1.0) / (lay.grad_accum * dims.dp)  # no label token anywhere: the loss is 0
            for b in batches:
                b["loss_divisor"] = divisor
        return batches, total

    def _global_indices(self, step: int) -> list[int]:
        return self.sampler.indices_for_step(step)

    @staticmethod
    def _reduce(stats: dict[str, torch.Tensor], group) -> dict[str, torch.Tensor]:
        """Sum statistics over ``group`` in one collective (counts, not averages, are summed)."""
        keys = sorted(stats)
        flat = torch.cat([stats[k].double().reshape(-1) for k in keys])  # fp64: exact counts past 2^24 tokens
        hc.all_reduce(flat, group=group)
        flat = flat.cpu()  # the step's one host sync: the logged values
        out, i = {}, 0
        for k in keys:
            n = stats[k].numel()
            out[k] = flat[i:i + n].reshape(stats[k].shape).float()
            i += n
        return out

    @staticmethod
    def _add(total: dict, stats: dict) -> dict:
        for k, v in stats.items():
            v = v.detach().float()  # stays on the device: no host sync per micro-batch
            total[k] = total[k] + v if k in total else v
        return total

    # ---- loop --------------------------------------------------------------------------------------
    def train_step(self) -> tuple[dict[str, float], int]:
        """One optimizer step; returns (summed-and-summarised metrics, items processed globally)."""
        lay, dims, t = self.layout, self.dims, self.cfg.train
        torch.manual_seed(step_seed(t.seed, self.step, dims.dp_rank))
        indices = self._global_indices(self.step)
        self.engine.train()
        if self.pipelined:
            return self._pipeline_step(indices)
        totals: dict[str, torch.Tensor] = {}
        items = 0
        batches, _ = self._step_batches(indices, self.train_data)
        for batch in batches:
            loss, stats = self.task.loss_and_stats(self.engine, batch)
            extra = penalty(self.model_for_penalty, l1=t.l1, l2=t.l2)
            self.engine.backward(loss if extra is None else loss + extra)
            self.engine.step()
            self._add(totals, stats)
            items += self.task.items_in(batch)
        # the guards' flags ride in the one per-step reduction (dp spans the world unless tp > 1)
        totals = self.guards.unfold(self._reduce(self.guards.fold(totals), dims.dp_group), spans_world=dims.tp == 1)
        return self.task.summarize(totals), items * dims.dp

    def _rank_micro_batches(self, indices: list[int], dataset) -> tuple[list[tuple], float | None, int]:
        """(inputs, labels) per micro-batch for DeepSpeed's pipeline, the step's global loss-term count (see
        ``_step_batches``) and this rank's tokens. Packed rows send (input_ids, positions, segments) to the first
        stage, which passes positions and segments on to every block (parallelize/pipeline.py); the loss divisor
        travels to the last stage with the labels."""
        batches, total = self._step_batches(indices, dataset)
        out = []
        for batch in batches:
            if hasattr(self.task, "pipeline_labels"):
                labels = self.task.pipeline_labels(batch)
            elif "loss_divisor" in batch:
                labels = (batch["labels"], torch.tensor(batch["loss_divisor"], dtype=torch.float32, device=self.device))
            else:
                labels = batch["labels"]
            out.append((pipeline_inputs(batch), labels))
        return out, total, sum(b["input_ids"].numel() for b in batches)

    def _pipeline_step(self, indices: list[int]) -> tuple[dict[str, float], int]:
        """1F1B over this rank's micro-batches (DeepSpeed's engine); the loss comes back on every stage, averaged
        over micro-batches and data-parallel ranks — with the step's loss divisor, the global token mean."""
        batches, total, tokens = self._rank_micro_batches(indices, self.train_data)
        loss = self.engine.train_batch(data_iter=iter(batches)).detach().float().cpu()
        self.guards.after_pipeline_step(loss)
        tokens *= self.dims.dp
        count = torch.tensor(float(tokens if total is None else total))
        return self.task.summarize({"loss_sum": loss * count, "count": count}), tokens

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Average floating buffers (BatchNorm running statistics) over data-parallel ranks, so evaluation
        and checkpoints see one model rather than each rank's own statistics."""
        if self.dims.dp == 1:
            return
        for buf in self.engine.module.buffers():
            if buf.is_floating_point() and buf.numel():
                hc.all_reduce(buf, group=self.dims.dp_group)
                buf.div_(self.dims.dp)

    @torch.no_grad()
    def evaluate(self, dataset=None, *, max_batches: int | None = None) -> dict[str, float]:
        """Validation metrics over the first ``eval_batches`` micro-batches per rank, summed over dp."""
        dataset = dataset if dataset is not None else self.val_data
        if dataset is None or len(dataset) == 0:
            return {}
        self.sync_buffers()
        dims, micro = self.dims, self.layout.micro_batch_size
        n_batches = max_batches or eval_batch_count(self.cfg.train.eval_batches, len(dataset),
                                                    micro_batch_size=micro, dp_size=dims.dp)
        if self.pipelined:
            return self._pipeline_evaluate(dataset, n_batches)
        self.engine.eval()
        totals: dict[str, torch.Tensor] = {}
        for b in range(n_batches):
            if b * dims.dp * micro >= len(dataset):  # rank 0 is out of data: every rank stops here together
                break
            start = (b * dims.dp + dims.dp_rank) * micro
            # A rank past the end still runs a forward (on the first rows) and counts zeros: under ZeRO-3 every
            # forward gathers parameters collectively, so all dp ranks must run the same number of them.
            past_end = start >= len(dataset)
            idx = list(range(0 if past_end else start, min((0 if past_end else start) + micro, len(dataset))))
            _, stats = self.task.loss_and_stats(self.engine, self._micro_batch(idx, dataset))
            if past_end:
                stats = {k: torch.zeros_like(v.detach().float()) for k, v in stats.items()}
            self._add(totals, stats)
        self.engine.train()
        return self.task.summarize(self._reduce(totals, dims.dp_group))

    def _pipeline_evaluate(self, dataset, n_batches: int) -> dict[str, float]:
        lay, dims = self.layout, self.dims
        per_pass = lay.grad_accum * lay.micro_batch_size * dims.dp
        losses, weights = [], []
        for b in range(max(1, n_batches // lay.grad_accum)):
            if (b + 1) * per_pass > len(dataset):
                break
            batches, total, _ = self._rank_micro_batches(list(range(b * per_pass, (b + 1) * per_pass)), dataset)
            loss = self.engine.eval_batch(data_iter=iter(batches)).detach().float().cpu()
            weights.append(1.0 if total is None else total)  # each pass: its token mean, weighted by its tokens
            losses.append(loss * weights[-1])
        self.engine.train()
        if not losses:
            return {}
        count = torch.tensor(float(sum(weights)))
        return self.task.summarize({"loss_sum": torch.stack(losses).sum(), "count": count})

    def save(self) -> str | None:
        """Save this step; None when the save failed and checkpoint.on_save_error=continue."""
        from megatrain.checkpoint.layout_free import SaveError
        try:
            with self.watchdog.phase(f"checkpoint save at step {self.step}"):
                self.last_good = self._save()
        except SaveError as err:
            if self.cfg.checkpoint.on_save_error == "stop":
                raise
            print(f"warning: {err}; training goes on (checkpoint.on_save_error=continue)", flush=True)
            return None
        return self.last_good

    def _save(self) -> str:
        from megatrain.checkpoint.layout_free import save_checkpoint
        self.sync_buffers()
        state = {"seed": self.cfg.train.seed, "consumed_samples": self.step * self.layout.global_batch_size,
                 "layout": self.layout.__dict__, "config": self.cfg.model_dump(mode="json"),
                 "rng": "re-derived per (train.seed, step, dp rank)", "skipped_batches": sorted(self.skipped_batches)}
        return save_checkpoint(self.engine, self.dims, self.ckpt_dir, self.step, state,
                               keep_last=self.cfg.checkpoint.keep_last)

    def _after_nonfinite(self, metrics: dict, logger) -> bool:
        """Apply train.nonfinite after a step every rank agreed was non-finite; True after a rollback."""
        action = self.guards.policy.decide(self.step, self.guards.nonfinite, last_good=self.last_good)
        if action == "ok":
            return False
        bad_step = self.step
        if action == "rollback":
            from megatrain.train.nonfinite import reload_checkpoint
            res = reload_checkpoint(self.engine, self.dims, self.last_good, self.cfg.model)
            self.skipped_batches.add(bad_step - 1)  # the batch of step `bad_step` (indices_for_step is 0-based)
            self.step = int(res.manifest["step"])
            self.scheduler.last_epoch = self.step - 1
            self.scheduler.step()
            logger.rewind(self.step)
        logger.message(f"step {bad_step}: non-finite loss or gradients on some rank; the step was not applied "
                       + (f"(rolled back to {self.last_good}, its batch will be skipped)" if action == "rollback"
                          else "(skipped)"))
        return action == "rollback"  # a skipped step is still logged (its loss shows why) and may be saved

    def _preempt(self, logger, *, saved: bool) -> None:
        """Every rank agreed a signal arrived: save this step (unless just saved) and stop the loop."""
        path = self.last_good if saved else self.save()
        self.preempted = self.guards.preemption.signame or "a signal on another rank"
        logger.message(f"preempted ({self.preempted}) after step {self.step}: saved {path}; resume with "
                       "--checkpoint.resume=auto")

    def export(self, step_dir: str) -> None:
        """Write the checkpoint at ``step_dir`` as a Hugging Face directory (checkpoint.export_hf; LoRA adapters
        merged) and/or its adapters as a PEFT directory (checkpoint.export_peft), reading it once (rank 0;
        others wait)."""
        ck = self.cfg.checkpoint
        if self.rank == 0:
            from megatrain.checkpoint.layout_free import load_model_state
            cfg, state = load_model_state(step_dir)
            if ck.export_hf:
                from megatrain.interop.hf import save_state_pretrained
                out = save_state_pretrained(state, cfg.model, ck.export_hf, dtype=ck.export_dtype,
                                            overwrite=ck.export_overwrite,
                                            tokenizer=self.cfg.data.path if cfg.model.is_transformer else None)
                print(f"exported Hugging Face model: {out}", flush=True)
            if ck.export_peft:
                from megatrain.interop.peft import save_peft_adapter
                out = save_peft_adapter(state, cfg.model, ck.export_peft, overwrite=ck.export_overwrite)
                print(f"exported PEFT adapter: {out}", flush=True)
        hc.barrier()

    def run(self) -> dict[str, float]:
        cfg = self.cfg
        logger = RunLogger(cfg.log.dir, total_steps=cfg.train.max_steps, start_step=self.step,
                           progress=cfg.log.progress, tensorboard=cfg.log.tensorboard, active=self.rank == 0)
        if self.rank == 0:
            from megatrain.config import dump_config
            os.makedirs(cfg.log.dir, exist_ok=True)
            atomic_write_text(os.path.join(cfg.log.dir, "config.yaml"), dump_config(cfg))
        n_params = sum(p.numel() for p in self.model_for_penalty.parameters())
        from megatrain.parallelize.lora import trainable_count
        n_train = trainable_count(self.model_for_penalty)
        trainable = "" if n_train == n_params else f" ({n_train / 1e6:.3f}M trainable)"
        logger.message(f"megatrain: {cfg.model.arch} {n_params / 1e6:.2f}M params/rank{trainable} | {self.layout.describe()} | "
                       f"zero={cfg.parallel.zero_stage} precision={cfg.train.precision} device={self.device.type}"
                       + (f" | resumed from {self.resumed_from}" if self.resumed_from else ""))
        last: dict[str, float] = {}
        first_step = self.step
        from megatrain.train.perf import StepPerf
        perf = StepPerf(cfg, self.device, self.world)
        try:
            while self.step < cfg.train.max_steps:
                if self.step in self.skipped_batches:  # a batch a rollback chose to skip: consume it unseen
                    self.step += 1
                    self.scheduler.step()
                    continue
                lr = self.scheduler.get_last_lr()[0]
                t0 = time.perf_counter()
                with self.watchdog.phase(f"training step {self.step + 1}"):
                    metrics, items = self.train_step()
                dt = time.perf_counter() - t0
                self.step += 1
                if self._after_nonfinite(metrics, logger):
                    continue
                record = {"step": self.step, **metrics, "lr": lr, "tokens_per_s": items / dt, "step_time_s": dt,
                          **perf.fields(items / dt)}
                if comm_counter.enabled_by_env():
                    record["comm_bytes"] = comm_counter.take()  # this rank's payload bytes in the step
                every = cfg.train.eval_every
                if self.val_data is not None and ((every and self.step % every == 0) or self.step == cfg.train.max_steps):
                    with self.watchdog.phase(f"validation after step {self.step}"):
                        record.update({f"val_{k}": v for k, v in self.evaluate().items()})
                        if self.old_val_data is not None:  # continual training: forgetting on the old data
                            record.update({f"old_val_{k}": v for k, v in self.evaluate(self.old_val_data).items()})
                if self.step % cfg.train.log_every == 0 or "val_loss" in record or self.step == cfg.train.max_steps:
                    logger.log(record)
                last = record
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save()
                    if self.guards.preempt:
                        self._preempt(logger, saved=True)
                        break
                elif self.guards.preempt:
                    self._preempt(logger, saved=False)
                    break
            if self.preempted:
                return last
            saved = cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0
            final_dir = None
            exporting = cfg.checkpoint.export_hf or cfg.checkpoint.export_peft
            if (cfg.checkpoint.save_final or exporting) and (self.step > first_step or self.resume is None) \
                    and not saved:
                final_dir = self.save()
            final_dir = final_dir or os.path.join(self.ckpt_dir, f"step_{self.step:08d}")
            if exporting:
                self.export(final_dir)
        finally:
            logger.close()
            self.watchdog.close()
            self.guards.close()
        if self.rank == 0 and cfg.log.report:
            from megatrain.train.report import write_report
            path = write_report(cfg.log.dir)
            if path:
                logger.message(f"report: {path}")
        return last


def pipeline_inputs(batch: dict):
    """What the pipeline's first stage takes: input_ids (B, T), or for packed rows (input_ids, positions,
    segments), each (B, T) int64 — integer tensors ride between stages without gradients (DeepSpeed sends
    gradients back only for floating tensors). A batch with one of the two gets the other's default."""
    ids = batch["input_ids"]
    if "positions" not in batch and "segments" not in batch:
        return ids
    positions = batch.get("positions")
    if positions is None:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
    segments = batch.get("segments")
    if segments is None:
        segments = torch.zeros_like(ids)  # one document per row
    return ids, positions, segments


def run_dirs(cfg) -> dict[str, str]:
    """The directories a run owns exclusively, by the config field that names them."""
    dirs = {"log.dir": cfg.log.dir}
    if cfg.checkpoint.dir:
        dirs["checkpoint.dir"] = cfg.checkpoint.dir
    return dirs
