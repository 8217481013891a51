"""Ensembles of checkpoints: average probabilities or majority vote; member and ensemble metrics.

Members are megatrain checkpoints (a run dir, its ``checkpoints`` dir, or one ``step_XXXXXXXX`` dir); each
carries its own config in ``megatrain.json``, so members may differ in architecture, width or seed. All are
scored on the validation split of the config ``launch/evaluate.py`` is given, which must not overlap with
the samples any member trained on (checked: an overlap would flatter the ensemble).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

from megatrain.distributed.env import is_main_process
from megatrain.eval._io import write_json, write_text
from megatrain.train.metrics import classification_metrics, confusion_matrix
from megatrain.errors import CheckpointError, UserError


def combine(probs: list[torch.Tensor], mode: str = "mean_prob") -> torch.Tensor:
    """M member probabilities (N, C) -> ensemble scores (N, C); argmax gives the prediction.

    mean_prob: the average distribution (a proper probability; its NLL is meaningful).
    vote: votes per class, ties broken by the mean probability (added at weight < 1, so it never outvotes).
    """
    if not probs:
        raise UserError("eval.ensemble is empty; list at least one checkpoint")
    stack = torch.stack([p.double() for p in probs])  # (M, N, C)
    mean = stack.mean(0)  # (N, C)
    if mode == "mean_prob":
        return mean
    if mode == "vote":
        votes = F.one_hot(stack.argmax(-1), stack.shape[-1]).sum(0).double()  # (N, C)
        return votes + 0.5 * mean
    raise UserError(f"eval.ensemble_mode={mode!r} is not mean_prob or vote")


def score(probs: torch.Tensor, labels: torch.Tensor, num_classes: int, *, proper: bool = True) -> dict[str, float]:
    """Metrics of (N, C) scores; ``loss`` (mean NLL) only when the scores are probabilities."""
    preds = probs.argmax(-1)
    out: dict[str, float] = {}
    if proper:
        nll = -torch.log(probs.double().gather(1, labels.view(-1, 1)).clamp_min(1e-12)).mean()
        out["loss"] = float(nll)
    m = classification_metrics(confusion_matrix(preds, labels, num_classes))
    out.update({k: m[k] for k in ("accuracy", "f1_macro", "precision_macro", "recall_macro")})
    return out


# ---- checkpoints ------------------------------------------------------------------------------------------
def resolve_step_dir(path: str) -> str:
    """The step directory of a run dir, a checkpoints dir (its ``latest``), or a step dir itself."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path}: no such path; give a run dir, its checkpoints dir or a step_XXXXXXXX dir")
    for cand in (path, os.path.join(path, "checkpoints")):
        if any(os.path.isfile(os.path.join(cand, f)) for f in ("manifest.json", "megatrain.json")):
            return cand
        latest = os.path.join(cand, "latest")
        if os.path.isfile(latest):
            with open(latest, encoding="utf-8") as f:
                return os.path.join(cand, f.read().strip())
    raise UserError(f"checkpoint {path}: no checkpoint in it (no manifest.json or latest); did the run save one "
                     "(checkpoint.save_final=true)?")


def load_member(path: str, *, shared=None):
    """(config, task, model in eval mode on CPU) for one checkpoint. ``shared`` = (data config, loaded pool,
    arch) reuses arrays already in memory when the member was trained on the same data."""
    from megatrain.train.tasks import make_task

    step = resolve_step_dir(path)
    from megatrain.infer.load import checkpoint_config
    if checkpoint_config(step).model.is_transformer:  # built on the device, not load_state_dict into meta tensors
        from megatrain.infer.load import load_for_inference
        loaded = load_for_inference(step, device="cpu", need_tokenizer=False)
        return loaded.config, make_task(loaded.config), loaded.model
    cfg, state = _read_checkpoint(step)
    if cfg.model.task == "classification":
        from megatrain.train.classification_task import ClassificationTask
        same = shared is not None and cfg.data == shared[0] and cfg.model.arch == shared[2]
        task = ClassificationTask(cfg, pool=shared[1] if same else None)
    else:
        task = make_task(cfg)
    model = task.build_model()  # ResNet / RNN: built for real (only Transformers are built on meta)
    if getattr(model, "tied", False):  # tied LM heads are stored once, under the embedding's name
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and getattr(model, "tied", False))]
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not match its model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); was it written by another megatrain version?")
    return cfg, task, model.eval()


def _read_checkpoint(step_dir: str):
    """(Config, {name: fp32 tensor}) from a layout-free checkpoint (manifest.json) or the older per-engine
    DeepSpeed layout (megatrain.json + *model_states.pt)."""
    from megatrain.config import build_config

    if os.path.isfile(os.path.join(step_dir, "manifest.json")):
        from megatrain.checkpoint import load_model_state
        cfg, state = load_model_state(step_dir)
    else:
        from megatrain.safe_io import load_legacy_module_state, read_json
        meta_path = os.path.join(step_dir, "megatrain.json")
        meta = read_json(meta_path, what="checkpoint metadata", fix="was it saved by megatrain?",
                         error=CheckpointError)
        if not isinstance(meta.get("config"), dict):
            raise CheckpointError(f"checkpoint metadata {meta_path}: no 'config' object; was it saved by megatrain?")
        cfg = build_config(meta["config"])
        files = sorted(f for f in os.listdir(step_dir) if f.endswith("model_states.pt"))
        if not files:
            raise UserError(f"checkpoint {step_dir}: no model files; was it saved by megatrain?")
        state = load_legacy_module_state(os.path.join(step_dir, files[0]))
    return cfg, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


# ---- tools ------------------------------------------------------------------------------------------------
def train_members(cfg, *, train_fn=None, log: Callable[[str], None] = print) -> list[str]:
    """Train ``eval.ensemble_members`` runs of ``cfg`` with seeds train.seed, train.seed+1, ... in
    ``<log.dir>/member_i`` (finished members are not rerun) and return their run dirs.

    The seed changes the init, the data order, dropout and the augmentation draws; the train/validation split
    (data.split_seed) stays fixed, so every member is scored on the same held-out samples."""
    from megatrain.eval.search import run_trials, trial_config

    n = cfg.eval.ensemble_members
    if cfg.eval.ensemble:
        raise UserError("eval.ensemble and eval.ensemble_members are both set; list existing checkpoints or train "
                         "new members, not both")
    if n < 2:
        raise UserError(f"eval.ensemble_members={n}: an ensemble needs at least 2 members; use 0 to turn it off")
    params = [{"train.seed": cfg.train.seed + i} for i in range(n)]
    # members are ordinary runs: they keep their final checkpoint and do not recurse into ensembling
    fixed = {"checkpoint.save_final": True, "eval.ensemble_members": 0}
    configs = [trial_config(cfg, {**p, **fixed}, os.path.join(cfg.log.dir, f"member_{i}")) for i, p in enumerate(params)]
    run_trials(configs, params, train_fn=train_fn, log=log, name="member", hint="train.seed changed")
    return [c.log.dir for c in configs]


def run_ensemble(cfg, paths: list[str] | None = None, *, log: Callable[[str], None] = print) -> dict:
    """Score every checkpoint in ``paths`` (default ``eval.ensemble``) and their combination on ``cfg``'s
    validation split; writes ``ensemble.md``, ``ensemble.json`` and ``ensemble_confusion.png`` into ``log.dir``."""
    from megatrain.train.classification_task import ClassificationTask

    if cfg.model.task != "classification":
        raise UserError("eval.ensemble combines classifiers; set model.task=classification in the config")
    paths = list(cfg.eval.ensemble if paths is None else paths)
    base = ClassificationTask(cfg)
    val = base.val_dataset()
    if val is None:
        raise UserError("the validation split is empty; set data.val_fraction > 0 to score the ensemble")
    val_idx = set(base.val_idx.tolist())
    base_labels = torch.from_numpy(base.pool.y[base.val_idx])
    rows, probs, labels = [], [], None
    for path in paths:
        mcfg, task, model = load_member(path, shared=(cfg.data, base.pool, cfg.model.arch))
        if not isinstance(task, ClassificationTask):
            raise UserError(f"eval.ensemble member {path} is a {mcfg.model.task} model; all members must classify")
        leaked = len(val_idx.intersection(task.train_idx.tolist()))
        if leaked:
            raise UserError(f"eval.ensemble member {path} trained on {leaked} of the validation samples; "
                             "train members with the same data split (data.val_fraction) as the evaluation config")
        # each member reads the samples its own way (pixels for a CNN, token rows for an RNN)
        p, y = task.predict_proba(model, task.dataset_for(base.val_idx))
        if not torch.equal(y, base_labels):
            raise UserError(f"eval.ensemble member {path} was trained on other data ({mcfg.data.dataset} at "
                             f"{mcfg.data.path}); all members must share the evaluation config's data")
        labels = y
        probs.append(p)
        rows.append({"member": path, **score(p, y, base.num_classes)})
        log(f"member {path}: " + " ".join(f"{k}={v:.4f}" for k, v in rows[-1].items() if k != "member"))
    mode = cfg.eval.ensemble_mode
    scores = combine(probs, mode)
    ens = {"member": f"ensemble ({mode}, {len(probs)})", **score(scores, labels, base.num_classes,
                                                                proper=mode == "mean_prob")}
    best = max(rows, key=lambda r: r["accuracy"])
    result = {"mode": mode, "members": rows, "ensemble": ens, "best_member": best["member"],
              "num_val": len(labels), "gain_vs_best": ens["accuracy"] - best["accuracy"]}
    table = format_table(rows + [ens])
    log(table)
    if is_main_process():
        os.makedirs(cfg.log.dir, exist_ok=True)
        write_text(os.path.join(cfg.log.dir, "ensemble.md"),
                   f"# Ensemble of {len(rows)} checkpoints ({mode}) on {len(labels)} validation samples\n\n{table}")
        write_json(os.path.join(cfg.log.dir, "ensemble.json"), result)
        from megatrain.eval.plots import plot_confusion
        plot_confusion(confusion_matrix(scores.argmax(-1), labels, base.num_classes),
                       os.path.join(cfg.log.dir, "ensemble_confusion.png"),
                       class_names=base.pool.class_names or None, title=f"ensemble ({mode})")
    return result


def format_table(rows: list[dict]) -> str:
    keys = ["accuracy", "f1_macro", "precision_macro", "recall_macro", "loss"]
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['member']} | " + " | ".join(f"{r[k]:.4f}" if k in r else "-" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def evaluate_checkpoint(cfg, path: str, *, log: Callable[[str], None] = print) -> dict:
    """Metrics of one model, written to ``<log.dir>/eval.json``. Classifiers (a checkpoint): the whole validation
    split of their own config, with a confusion matrix PNG. Language models — a Transformer or RNN checkpoint, a
    saved model or a Hugging Face dir: loss, perplexity and tokens counted on ``--data.path`` (a prepared dir or a
    raw text/JSONL file) or, without it, the checkpoint's own validation split (megatrain.eval.heldout)."""
    from megatrain.infer.load import model_kind

    if model_kind(path) == "checkpoint" and _checkpoint_task(path) == "classification":
        metrics = _evaluate_classifier(cfg, path)
        out = {"checkpoint": path, "metrics": metrics}
    else:
        from megatrain.eval.heldout import evaluate_lm_model
        result = evaluate_lm_model(cfg, path, log=log)
        metrics = {k: result[k] for k in ("loss", "ppl", "tokens", "samples")}
        out = {"checkpoint": path, "metrics": metrics, **{k: result[k] for k in ("data", "split", "seq_len",
                                                                                   "model_kind")}}
    if is_main_process():
        os.makedirs(cfg.log.dir, exist_ok=True)
        write_json(os.path.join(cfg.log.dir, "eval.json"), out)
    log(" ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics


def _checkpoint_task(path: str) -> str:
    """model.task of the checkpoint at ``path``, read from its config alone."""
    from megatrain.infer.load import checkpoint_config
    return checkpoint_config(path).model.task


def _evaluate_classifier(cfg, path: str) -> dict:
    from megatrain.train.classification_task import ClassificationTask

    _, task, model = load_member(path)
    if not isinstance(task, ClassificationTask):
        raise UserError(f"checkpoint {path}: model.task={task.cfg.model.task} is not classification")
    val = task.val_dataset()
    if val is None:
        raise UserError(f"checkpoint {path}: its config has no validation split to evaluate on")
    probs, labels = task.predict_proba(model, val)
    metrics = score(probs, labels, task.num_classes)
    cm = confusion_matrix(probs.argmax(-1), labels, task.num_classes)
    metrics["num_samples"] = len(labels)
    if is_main_process():
        from megatrain.eval.plots import plot_confusion
        os.makedirs(cfg.log.dir, exist_ok=True)
        plot_confusion(cm, os.path.join(cfg.log.dir, "confusion.png"), class_names=task.pool.class_names or None)
        metrics["confusion"] = cm.tolist()
    return metrics
