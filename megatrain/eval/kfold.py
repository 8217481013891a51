"""K-fold cross-validation: a (stratified) splitter and ``run_kfold`` that trains one model per fold.

Splitting rules (checked, one-line ValueErrors):
  * k >= 2 and k <= number of samples (a fold must hold at least one validation sample);
  * stratified: every class needs at least k members, otherwise some fold would validate without that class
    and its per-class metrics (and macro F1) would be undefined there. scikit-learn only warns here; we stop,
    because a CV table averaged over folds that measured different things is silently misleading.
Folds are disjoint and together cover every sample exactly once; fold sizes differ by at most one, and for
stratified splits every class's count per fold differs by at most one.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable

import numpy as np

from megatrain.distributed.env import is_main_process
from megatrain.eval._io import write_json, write_text
from megatrain.errors import UserError


def kfold_indices(labels_or_n: np.ndarray | int, k: int, *, stratified: bool = True,
                  seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` sorted (train_idx, val_idx) pairs over ``range(N)``; ``labels_or_n`` is (N,) labels or N."""
    if isinstance(labels_or_n, (int, np.integer)):
        n, labels = int(labels_or_n), None
    else:
        labels = np.asarray(labels_or_n)
        n = len(labels)
    if k < 2:
        raise UserError(f"eval.kfold={k}: cross-validation needs at least 2 folds; use 0 to turn it off")
    if k > n:
        raise UserError(f"eval.kfold={k} exceeds the {n} samples; use at most {n} folds")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(n, dtype=np.int64)
    if stratified:
        if labels is None:
            raise UserError("stratified folds need labels; pass the label array or set eval.stratified=false")
        classes, counts = np.unique(labels, return_counts=True)
        if counts.min() < k:
            c = classes[counts.argmin()]
            raise UserError(f"eval.kfold={k} but class {c} has only {counts.min()} samples; lower eval.kfold to "
                             f"{counts.min()} or set eval.stratified=false")
        start = 0
        for c in classes:
            idx = np.flatnonzero(labels == c)
            idx = idx[rng.permutation(len(idx))]
            # deal round-robin, continuing where the previous class stopped so fold sizes stay balanced
            fold_of[idx] = (start + np.arange(len(idx))) % k
            start = (start + len(idx)) % k
    else:
        perm = rng.permutation(n)
        fold_of[perm] = np.arange(n) % k
    return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]


def summarize_folds(results: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {mean, std, min, max}} over folds; std is the sample std (ddof=1), as CV papers report.
    Only validation metrics (``val_*``) are summarised when the runs report them: CV measures held-out data."""
    keys = [k for k in results[0] if all(isinstance(r.get(k), (int, float)) for r in results)]
    if any(k.startswith("val_") for k in keys):
        keys = [k for k in keys if k.startswith("val_")]
    out = {}
    for key in keys:
        vals = np.array([float(r[key]) for r in results])
        out[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                    "min": float(vals.min()), "max": float(vals.max())}
    return out


def format_table(results: list[dict[str, float]], summary: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per fold, then mean ± std."""
    keys = list(summary)
    lines = ["| fold | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for i, r in enumerate(results):
        lines.append(f"| {i} | " + " | ".join(_fmt(r[k]) for k in keys) + " |")
    lines.append("| mean ± std | " + " | ".join(f"{_fmt(summary[k]['mean'])} ± {_fmt(summary[k]['std'])}"
                                                 for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: float) -> str:
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return str(v)
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"


TrainFn = Callable[["object", np.ndarray, np.ndarray], dict]


def run_kfold(cfg, *, train_fn: TrainFn | None = None, pool_labels: np.ndarray | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Train ``eval.kfold`` models, fold ``i`` in ``<log.dir>/fold_i``, and write ``kfold.md``/``kfold.json``.

    The folds partition the whole labelled pool (train + validation split together). ``train_fn(cfg_fold,
    train_idx, val_idx) -> metrics`` defaults to a classification run through the Trainer. A fold whose
    ``result.json`` exists is not retrained, so an interrupted CV resumes.
    """
    k = cfg.eval.kfold
    if cfg.model.task != "classification":
        raise UserError("eval.kfold needs model.task=classification (folds are over labelled samples)")
    if pool_labels is None:
        from megatrain.train.classification_task import pool_labels as _pool_labels
        pool_labels = _pool_labels(cfg)
    if train_fn is None:
        train_fn = train_fold
    folds = kfold_indices(pool_labels, k, stratified=cfg.eval.stratified, seed=cfg.train.seed)
    root = cfg.log.dir
    os.makedirs(root, exist_ok=True)
    results = []
    for i, (tr, va) in enumerate(folds):
        fold_dir = os.path.join(root, f"fold_{i}")
        result_path = os.path.join(fold_dir, "result.json")
        if os.path.isfile(result_path):
            with open(result_path, encoding="utf-8") as f:
                metrics = json.load(f)["metrics"]
            log(f"fold {i}: done earlier, {_brief(metrics)}")
        else:
            fold_cfg = cfg.model_copy(deep=True)
            fold_cfg.log.dir = fold_dir
            fold_cfg.eval.kfold = 0
            log(f"fold {i}/{k}: train {len(tr)} val {len(va)} -> {fold_dir}")
            metrics = train_fn(fold_cfg, tr, va)
            if is_main_process():
                os.makedirs(fold_dir, exist_ok=True)
                write_json(result_path, {"fold": i, "num_train": len(tr), "num_val": len(va), "metrics": metrics})
            log(f"fold {i}: {_brief(metrics)}")
        results.append(metrics)
    summary = summarize_folds(results)
    table = format_table(results, summary)
    if is_main_process():
        kind = "stratified" if cfg.eval.stratified else "plain"
        write_text(os.path.join(root, "kfold.md"), f"# {k}-fold cross-validation ({kind})\n\n{table}")
        write_json(os.path.join(root, "kfold.json"), {"k": k, "folds": results, "summary": summary})
    log(table)
    return {"folds": results, "summary": summary}


def train_fold(cfg, train_idx: np.ndarray, val_idx: np.ndarray) -> dict:
    """One fold through the normal Trainer with an explicit split of the labelled pool."""
    from megatrain.train.classification_task import ClassificationTask
    from megatrain.train.trainer import Trainer

    task = ClassificationTask(cfg, split=(train_idx, val_idx))
    return Trainer(cfg, task=task).run()


def _brief(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
