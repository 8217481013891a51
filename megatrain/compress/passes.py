"""The prune and distill passes as launch/ runs them: load → (score → prune → fine-tune)×n → save → table.

Both run on every rank of a launch (deepspeed / torchrun / python) under the layout of ``parallel``:
importance is computed on the model sharded by ``parallelize`` exactly as training shards it, fine-tuning and
distillation run under the normal Trainer, and the full tensors are gathered back after training. Every rank
holds the plain pruned model between steps (the surgery is cheap and identical everywhere); rank 0 writes.
"""
from __future__ import annotations

import copy
import os

import torch

from megatrain.compress.distill import DistillationTask, student_state
from megatrain.compress.gather import engine_state_dict
from megatrain.compress.importance import compute_scores
from megatrain.weights.sources import build_plain, load_model, save_model, tied_keys
from megatrain.compress.prune import Sizes, prune_model, step_sizes, target_sizes
from megatrain.compress.report import measure, write_table
from megatrain.config import build_config, resolve_layout
from megatrain.config.schema import Config, ModelConfig
from megatrain.distributed.env import is_main_process
from megatrain.models.build import build_model
from megatrain.train.lm_task import LanguageModelingTask
from megatrain.errors import UserError
from megatrain.distributed import host_collectives as hc


def with_fields(cfg: Config, **dotted) -> Config:
    """A validated copy of ``cfg`` with ``section__field=value`` (or model=ModelConfig) replaced."""
    tree = cfg.model_dump(mode="json")
    for key, value in dotted.items():
        if key == "model":
            tree["model"] = value.model_dump(mode="json")
            continue
        section, field = key.split("__")
        tree[section][field] = value
    return build_config(tree)


class GivenModelTask:
    """A task whose model is an already built (pruned) plain model; data and loss from the wrapped task."""

    def __init__(self, inner, model: torch.nn.Module):
        self.inner, self.model = inner, model

    def build_model(self):
        return copy.deepcopy(self.model)  # parallelize shards in place; keep ours plain

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _setup(cfg: Config, local_rank, *, pipeline: bool = False):
    """Process group and layout; ``pipeline`` = the pass can run with pp > 1 (distillation from a cache)."""
    from megatrain.distributed.dims import build_parallel_dims
    from megatrain.distributed.env import init_distributed
    from megatrain.config.preflight import preflight
    preflight(cfg)  # WORLD_SIZE, kernels, output dirs, layout, DeepSpeed JSON: before any group exists
    if cfg.parallel.pp > 1 and not pipeline:
        raise UserError("prune with parallel.pp>1 is not supported; use tp and ZeRO (train the result with pp "
                         "afterwards)")
    _, world, _ = init_distributed(local_rank)
    lay = resolve_layout(cfg, world)
    return lay, build_parallel_dims(tp=lay.tp, pp=lay.pp, dp=lay.dp)


def _source_model(cfg: Config, path: str | None, field: str) -> tuple[torch.nn.Module, ModelConfig]:
    if not path:
        return build_model(cfg.model, seed=cfg.train.seed), cfg.model
    model, model_cfg = load_model(path)
    if model_cfg.vocab_size != cfg.model.vocab_size:
        raise UserError(f"{field}={path} has vocab_size={model_cfg.vocab_size} but data.path's tokenizer has "
                         f"{cfg.model.vocab_size}; use the data the model was trained on")
    return model, model_cfg


def _calibration(cfg: Config, lay, dims, dataset) -> list[dict]:
    from megatrain.data.sampler import GlobalBatchSampler, rank_slice
    from megatrain.distributed.env import device
    sampler = GlobalBatchSampler(len(dataset), cfg.train.global_batch_size, cfg.train.seed)
    out, step = [], 0
    while len(out) < cfg.prune.calib_batches:
        indices = sampler.indices_for_step(step)
        for micro in range(lay.grad_accum):
            idx = rank_slice(indices, dp_rank=dims.dp_rank, dp_size=dims.dp, micro_batch_size=lay.micro_batch_size,
                             micro_step=micro)
            batch = torch.utils.data.default_collate([dataset[i] for i in idx])
            out.append({k: v.to(device()) for k, v in batch.items()})
        step += 1
    return out[:cfg.prune.calib_batches]


def _scores(model, cfg: Config, dims, batches):
    """Importance on the model sharded like training shards it; gathered so every rank has all units."""
    from megatrain.distributed.env import device
    from megatrain.parallelize import parallelize
    sharded = parallelize(copy.deepcopy(model), cfg, dims, device=device()).to(device())
    task = LanguageModelingTask(cfg)
    task.configure_parallel(dims)
    tp_group = dims.tp_group if dims.tp > 1 else None
    dp_group = dims.dp_group if dims.dp > 1 else None
    return compute_scores(cfg.prune.importance, sharded, batches, lambda m, b: task.loss_and_stats(m, b)[0],
                          tp_group=tp_group, dp_group=dp_group, sequence_parallel=cfg.parallel.sequence_parallel)


def _train(cfg: Config, task, model_cfg: ModelConfig, log_dir: str, steps: int) -> torch.nn.Module:
    """Run the normal Trainer for ``steps`` and return the plain model (any arch) with the trained weights and
    buffers (without a distillation projection)."""
    from megatrain.train.trainer import Trainer
    run_cfg = with_fields(cfg, train__max_steps=steps, log__dir=log_dir, checkpoint__dir=None,
                          checkpoint__resume="none", checkpoint__export_hf=None)
    trainer = Trainer(run_cfg, task)
    trainer.run()
    state = engine_state_dict(trainer.engine, trainer.dims)  # fp32 master weights, any tp/pp layout, ZeRO 0-3
    # BatchNorm running statistics are buffers: not partitioned, and averaged over dp by the Trainer
    state.update({name: buf.detach().cpu().clone() for name, buf in trainer.engine.module.named_buffers()})
    if model_cfg.tied:
        head, embed = tied_keys(model_cfg)
        state.setdefault(head, state[embed])
    return build_plain(model_cfg, student_state_from(state))


def student_state_from(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("distill_proj.")}


def run_prune(cfg: Config, *, local_rank: int | None = None) -> list[dict]:
    """Prune cfg.prune.source (or the config's model) to the target sizes; returns the table rows."""
    if not cfg.model.is_transformer:  # ResNet channels / RNN hidden units, through the config's own task
        from megatrain.compress.passes_channels import run_prune_channels
        return run_prune_channels(cfg, local_rank=local_rank)
    p = cfg.prune
    lm = LanguageModelingTask(cfg)  # fills model.vocab_size from the data
    model, model_cfg = _source_model(cfg, p.source, "prune.source")
    cfg = with_fields(cfg, model=model_cfg)
    start, target = Sizes.of(model_cfg), target_sizes(model_cfg, p, tp=cfg.parallel.tp)  # before any group
    lay, dims = _setup(cfg, local_rank)
    val, train = lm.val_dataset() or lm.train_dataset(), lm.train_dataset()
    rows = [measure("original", model, model_cfg, cfg, val)]
    steps = p.iterations if p.schedule == "iterative" else 1
    batches = _calibration(cfg, lay, dims, train) if p.importance in ("taylor", "activation") else []
    for i in range(1, steps + 1):
        new = step_sizes(start, target, i, steps, tp=lay.tp)
        scores = _scores(model, cfg, dims, batches)
        model, model_cfg = prune_model(model.cpu(), model_cfg, scores, new)
        cfg = with_fields(cfg, model=model_cfg)
        if i == steps:
            rows.append(measure("pruned", model, model_cfg, cfg, val))
        if p.finetune_steps:
            log_dir = os.path.join(cfg.log.dir, "prune", f"finetune_{i}")
            model = _train(cfg, GivenModelTask(LanguageModelingTask(cfg), model.cpu()), model_cfg, log_dir,
                           p.finetune_steps)
    if p.finetune_steps:
        rows.append(measure("pruned + fine-tuned", model, model_cfg, cfg, val))
    out = p.out or os.path.join(cfg.log.dir, "pruned")
    if is_main_process():
        save_model(out, model.cpu(), model_cfg, extra={"pruned_from": p.source, "prune": p.model_dump(mode="json")})
        print(write_table(rows, out, "prune"), flush=True)
    hc.barrier()
    return rows


def run_distill(cfg: Config, *, local_rank: int | None = None) -> list[dict]:
    """Distill cfg.distill.teacher into the student (cfg.distill.student or the config's model)."""
    d = cfg.distill
    if not d.teacher and not d.teacher_cache:
        raise UserError("distill.teacher is not set; point it at a megatrain checkpoint, a pruned model dir or a "
                         "local Hugging Face dir, or set distill.teacher_cache")
    if cfg.parallel.pp > 1 and not d.teacher_cache:
        raise UserError("distill with parallel.pp>1 needs a precomputed teacher: the pipeline computes the loss on "
                         "its last stage, where a live teacher cannot run; write one with launch/cache_teacher.py and "
                         "set distill.teacher_cache")
    lm = LanguageModelingTask(cfg)
    _setup(cfg, local_rank, pipeline=True)
    student, student_cfg = _source_model(cfg, d.student, "distill.student")
    cfg = with_fields(cfg, model=student_cfg)
    val = lm.val_dataset() or lm.train_dataset()
    rows, teacher = [], None
    if d.teacher:  # with a cache the teacher is optional: its row in the table, and a check of the cache
        teacher = load_model(d.teacher)
        rows.append(measure("original (teacher)", *teacher, cfg, val))
    rows.append(measure("pruned (student)" if d.student else "student (init)", student, student_cfg, cfg, val))
    task = DistillationTask(cfg, teacher=teacher, student=student.cpu())
    distilled = _train(cfg, task, student_cfg, os.path.join(cfg.log.dir, "distill"), cfg.train.max_steps)
    rows.append(measure("distilled", distilled, student_cfg, cfg, val))
    if is_main_process():
        save_model(os.path.join(cfg.log.dir, "distilled"), distilled.cpu(), student_cfg,
                   extra={"distilled_from": d.teacher, "teacher_cache": d.teacher_cache, "student_init": d.student})
        print(write_table(rows, cfg.log.dir), flush=True)
    hc.barrier()
    return rows


def run_cache_teacher(cfg: Config, *, local_rank: int | None = None) -> str:
    """Run distill.teacher over the training samples and write its top-k targets to distill.teacher_cache.
    Data-parallel over the ranks of the launch (each writes whole shards; rank 0 writes the manifest last)."""
    from megatrain.compress.teacher_cache import MANIFEST, tensor_crc, write_manifest, write_teacher_cache
    from megatrain.distributed.env import device, init_distributed
    d = cfg.distill
    if not d.teacher or not d.teacher_cache:
        raise UserError("writing a teacher cache needs distill.teacher (the model to run) and distill.teacher_cache "
                         "(the output directory)")
    if os.path.exists(os.path.join(d.teacher_cache, MANIFEST)):
        raise UserError(f"distill.teacher_cache={d.teacher_cache} already holds a cache; delete it or choose "
                         "another directory")
    lm = LanguageModelingTask(cfg)  # fills model.vocab_size from the data
    teacher, teacher_cfg = load_model(d.teacher)
    if teacher_cfg.vocab_size != cfg.model.vocab_size:
        raise UserError(f"distill.teacher has vocab_size={teacher_cfg.vocab_size} but data.path's tokenizer has "
                         f"{cfg.model.vocab_size}; use the data the teacher was trained on")
    rank, world, _ = init_distributed(local_rank)
    teacher.requires_grad_(False)
    teacher.to(device())
    if d.teacher_bf16:
        teacher.to(torch.bfloat16)
    info = {"path": os.path.abspath(d.teacher), "model": teacher_cfg.model_dump(mode="json"),
            "weights_crc32": tensor_crc(teacher)}
    manifest = write_teacher_cache(d.teacher_cache, teacher, lm.train_dataset(), k=d.cache_topk or 32,
                                   temperature=d.temperature, vocab_size=cfg.model.vocab_size,
                                   value_dtype=d.cache_dtype, num_samples=d.cache_samples,
                                   micro_batch_size=cfg.train.micro_batch_size, rank=rank, world=world,
                                   teacher_info=info, log=lambda m: print(m, flush=True) if rank == 0 else None)
    hc.barrier()  # every shard is on disk before the manifest makes the cache visible
    if is_main_process():
        print(f"teacher cache: {write_manifest(d.teacher_cache, manifest)} ({manifest['num_samples']} samples, "
              f"k={manifest['k']}, T={manifest['temperature']})", flush=True)
    hc.barrier()
    return d.teacher_cache


__all__ = ["run_prune", "run_distill", "run_cache_teacher", "with_fields", "GivenModelTask", "student_state"]
