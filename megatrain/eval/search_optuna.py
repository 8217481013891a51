"""Model-based search (``search.method: tpe``): Optuna's Tree-structured Parzen Estimator proposes each trial
from the results so far; megatrain runs the trial exactly like a grid/random one (its own run dir, result.json).

The space file is the same as for random search. Optuna's categorical choices must be scalars, so a list of
choices is searched by index and mapped back (``model.widths: [[16, 32], [32, 64]]`` works). Resume: finished
trials (result.json) are fed back into the study as completed, so a rerun continues the search instead of
repeating it; the proposals after a resume may differ from an uninterrupted run (TPE's draws depend on the
history), which never reruns or loses a finished trial. Under several ranks rank 0 proposes and broadcasts.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

from megatrain.config.schema import Config
from megatrain.distributed.env import is_main_process
from megatrain.eval._io import write_json
from megatrain.eval.search import TrainFn, _jsonable, metric_key, train_trial, trial_config
from megatrain.errors import UserError

# TPE needs some random trials before its density model means anything; Optuna's default is 10, which would
# make a typical 6-12 trial CPU search purely random.
MIN_STARTUP_TRIALS = 2


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("search.method=tpe needs Optuna: pip install optuna (or use search.method=random)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def distributions(space: dict[str, Any]) -> dict[str, Any]:
    """Optuna distributions of a parsed space; lists become a categorical over their indices."""
    D = _optuna().distributions
    out = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            out[key] = D.CategoricalDistribution(list(range(len(spec))))
        elif spec["int"]:
            out[key] = D.IntDistribution(int(math.ceil(spec["low"])), int(spec["high"]), log=spec["log"])
        else:
            out[key] = D.FloatDistribution(float(spec["low"]), float(spec["high"]), log=spec["log"])
    return out


def to_params(space: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """Optuna's values -> config values (list choices by index; floats rounded like random search)."""
    out = {}
    for key, spec in space.items():
        v = raw[key]
        if isinstance(spec, list):
            out[key] = spec[v]
        else:
            out[key] = int(v) if spec["int"] else float(f"{v:.6g}")
    return out


def to_raw(space: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Config values of a finished trial -> Optuna's values (the inverse of ``to_params``)."""
    raw = {}
    for key, spec in space.items():
        v = params[key]
        raw[key] = [_jsonable(c) for c in spec].index(v) if isinstance(spec, list) else v
    return raw


def _objective(metrics: dict, metric: str) -> float | None:
    key = metric_key(metrics, metric)
    if key is None:
        have = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        raise UserError(f"eval.metric={metric} is not reported by the trials; choose one of {have}")
    value = float(metrics[key])
    return value if math.isfinite(value) else None  # a diverged trial teaches TPE nothing


def _broadcast(obj):
    from megatrain.distributed import host_collectives as hc
    return hc.broadcast_object(obj, src=0)


def run_tpe_trials(cfg: Config, space: dict[str, Any], *, train_fn: TrainFn | None = None,
                   log: Callable[[str], None] = print) -> list[dict]:
    """Run (or resume) ``search.trials`` TPE trials in ``<log.dir>/trial_XXX``; returns the unranked rows."""
    optuna = _optuna()
    train_fn = train_fn or train_trial
    dists = distributions(space)
    n = cfg.search.trials
    sampler = optuna.samplers.TPESampler(seed=cfg.train.seed, n_startup_trials=max(MIN_STARTUP_TRIALS, n // 3))
    study = optuna.create_study(direction="maximize" if cfg.search.mode == "max" else "minimize", sampler=sampler)
    rows = []
    for i in range(n):
        trial_dir = os.path.join(cfg.log.dir, f"trial_{i:03d}")
        result_path = os.path.join(trial_dir, "result.json")
        if os.path.isfile(result_path):
            with open(result_path, encoding="utf-8") as f:
                done = json.load(f)
            if set(done.get("params", {})) != set(space):
                raise UserError(f"{result_path} holds a trial over other fields ({sorted(done.get('params', {}))}); "
                                 "the space changed — use a new log.dir or delete the old trials")
            try:
                raw = to_raw(space, done["params"])
            except ValueError:
                raise UserError(f"{result_path}: its values {done['params']} are not choices of the current space; "
                                 "use a new log.dir or delete the old trials") from None
            value = _objective(done["metrics"], cfg.eval.metric)
            state = optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL
            study.add_trial(optuna.trial.create_trial(params=raw, distributions=dists, value=value, state=state))
            log(f"trial {i:03d}: finished earlier, skipped")
            rows.append(done)
            continue
        trial = study.ask(dists) if is_main_process() else None
        params = _broadcast(to_params(space, trial.params) if trial is not None else None)
        log(f"trial {i:03d}/{n}: {params}")
        metrics = train_fn(trial_config(cfg, params, trial_dir))
        row = {"trial": i, "params": _jsonable(params), "metrics": metrics}
        if trial is not None:
            value = _objective(metrics, cfg.eval.metric)
            study.tell(trial, value, state=None if value is not None else optuna.trial.TrialState.FAIL)
            os.makedirs(trial_dir, exist_ok=True)
            write_json(result_path, row)
        rows.append(row)
    return rows
