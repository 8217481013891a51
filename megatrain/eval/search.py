"""Hyper-parameter search: grid, random or TPE (Optuna, search_optuna.py) over dotted config fields, each trial
a normal training run.

Space file (``search.space``), one entry per config field::

    train.lr: {low: 1e-3, high: 3e-2, log: true}   # continuous range (random search only)
    train.weight_decay: {low: 0.0, high: 0.1}
    model.widths: [[16, 32, 64], [32, 64, 128]]       # a list = the choices (grid and random)
    train.max_steps: {low: 100, high: 300, int: true}

Trial ``i`` runs in ``<log.dir>/trial_{i:03d}`` and, once finished, leaves ``result.json`` there; a rerun of the
same search skips finished trials (the trial list is a pure function of the space, method, trials and seed).
The results table (``search.md``, ``search.json``) is sorted by ``eval.metric`` in ``search.mode`` order.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
from typing import Any, Callable

import yaml

from megatrain.config.loader import ConfigError, build_config
from megatrain.config.schema import Config, Section
from megatrain.distributed.env import is_main_process
from megatrain.eval._io import write_json, write_text
from megatrain.errors import UserError


def field_exists(dotted: str) -> bool:
    """True when ``section.key`` names a field of the config tree."""
    node: Any = Config
    for part in dotted.split("."):
        if not (isinstance(node, type) and issubclass(node, Section)) or part not in node.model_fields:
            return False
        node = node.model_fields[part].annotation
    # a whole section (e.g. "train") is not a field one can set to a value
    return not (isinstance(node, type) and issubclass(node, Section))


def parse_space(space: Any, *, method: str, source: str = "search.space") -> dict[str, Any]:
    """Validate a space mapping: {field: list of choices | {low, high, log?, int?}}."""
    if not isinstance(space, dict) or not space:
        raise UserError(f"{source}: must be a non-empty mapping of config fields to choices or ranges")
    out: dict[str, Any] = {}
    for key, spec in space.items():
        if not isinstance(key, str) or "." not in key or not field_exists(key):
            raise UserError(f"{source}: unknown config field {key!r}; use a dotted field such as train.lr")
        if key.split(".")[0] in ("log", "search"):
            raise UserError(f"{source}: {key} cannot be searched (log.dir and search.* are set per trial)")
        if isinstance(spec, list):
            if not spec:
                raise UserError(f"{source}: {key} has an empty list; give at least one value")
            out[key] = list(spec)
        elif isinstance(spec, dict):
            unknown = set(spec) - {"low", "high", "log", "int"}
            if unknown or not {"low", "high"} <= set(spec):
                raise UserError(f"{source}: {key} range must be {{low, high, log?, int?}} (got keys {sorted(spec)})")
            low, high = spec["low"], spec["high"]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
                raise UserError(f"{source}: {key} low/high must be numbers (got {low!r}, {high!r})")
            if low > high:
                raise UserError(f"{source}: {key} has low={low} > high={high}; swap them")
            if spec.get("log") and low <= 0:
                raise UserError(f"{source}: {key} log range needs low > 0 (got {low})")
            if method == "grid":
                raise UserError(f"{source}: {key} is a range, which grid search cannot enumerate; "
                                 "give a list of values or set search.method=random")
            out[key] = {"low": low, "high": high, "log": bool(spec.get("log", False)), "int": bool(spec.get("int", False))}
        else:
            raise UserError(f"{source}: {key} must be a list of values or a {{low, high}} range (got {spec!r})")
    return out


def load_space(path: str, *, method: str) -> dict[str, Any]:
    if not path or not os.path.isfile(path):
        raise UserError(f"search.space={path}: no such file; write a YAML mapping of config fields to choices")
    with open(path, encoding="utf-8") as f:
        try:
            space = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise UserError(f"search.space={path}: not valid YAML ({err.__class__.__name__})") from None
    return parse_space(space, method=method, source=f"search.space={path}")


def grid_trials(space: dict[str, Any]) -> list[dict[str, Any]]:
    keys = list(space)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k] for k in keys))]


def random_trials(space: dict[str, Any], num_trials: int, *, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)  # own stream: trial i's parameters never depend on anything but (space, seed)
    trials = []
    for _ in range(num_trials):
        params = {}
        for key, spec in space.items():  # dict order = file order, so draws are stable
            if isinstance(spec, list):
                params[key] = spec[rng.randrange(len(spec))]
                continue
            low, high = spec["low"], spec["high"]
            if spec["log"]:
                value = math.exp(rng.uniform(math.log(low), math.log(high)))
            else:
                value = rng.uniform(low, high)
            params[key] = int(round(value)) if spec["int"] else float(f"{value:.6g}")
        trials.append(params)
    return trials


def make_trials(cfg: Config, space: dict[str, Any]) -> list[dict[str, Any]]:
    if cfg.search.method == "grid":
        return grid_trials(space)
    return random_trials(space, cfg.search.trials, seed=cfg.train.seed)


def trial_config(cfg: Config, params: dict[str, Any], trial_dir: str) -> Config:
    """The base config with the trial's values and its own run directory, validated like a recipe."""
    tree = cfg.model_dump(mode="json")
    overrides = dict(params)
    overrides["log.dir"] = trial_dir
    overrides["search.space"] = None
    overrides["checkpoint.dir"] = None  # each trial keeps its checkpoints in its own run dir
    try:
        return build_config(tree, overrides)
    except ConfigError as err:
        raise UserError(f"search trial {params}: {err}") from None


def metric_key(metrics: dict, name: str) -> str | None:
    """The key holding ``eval.metric`` in a run's final record: the validation value when there is one."""
    for key in (name if name.startswith("val_") else f"val_{name}", name):
        if isinstance(metrics.get(key), (int, float)):
            return key
    return None


def rank_results(rows: list[dict], metric: str, mode: str) -> list[dict]:
    for r in rows:
        if metric_key(r["metrics"], metric) is None:
            have = sorted(k for k, v in r["metrics"].items() if isinstance(v, (int, float)))
            raise UserError(f"eval.metric={metric} is not reported by trial {r['trial']:03d}; choose one of {have}")
    return sorted(rows, key=lambda r: r["metrics"][metric_key(r["metrics"], metric)], reverse=(mode == "max"))


def format_table(rows: list[dict], metric: str) -> str:
    keys = list(rows[0]["params"]) if rows else []
    shown = [metric] + [m for m in ("loss", "accuracy", "f1_macro", "ppl") if m != metric]
    shown = [m for m in shown if rows and metric_key(rows[0]["metrics"], m)]
    mkeys = [metric_key(rows[0]["metrics"], m) for m in shown]
    lines = ["| rank | trial | " + " | ".join(mkeys + keys) + " |", "|---" * (len(mkeys) + len(keys) + 2) + "|"]
    for rank, r in enumerate(rows, 1):
        vals = [f"{r['metrics'].get(m, float('nan')):.4f}" for m in mkeys] + [_short(r["params"][k]) for k in keys]
        lines.append(f"| {rank} | {r['trial']:03d} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


TrainFn = Callable[[Config], dict]


def run_search(cfg: Config, *, train_fn: TrainFn | None = None, space: dict[str, Any] | None = None,
               log: Callable[[str], None] = print) -> list[dict]:
    """Run (or resume) every trial and write the ranked table; returns the ranked rows."""
    if space is None:
        space = load_space(cfg.search.space, method=cfg.search.method)
    else:
        space = parse_space(space, method=cfg.search.method)
    os.makedirs(cfg.log.dir, exist_ok=True)
    if cfg.search.method == "tpe":  # proposals depend on results so far: trials are drawn one at a time
        from megatrain.eval.search_optuna import run_tpe_trials
        rows = run_tpe_trials(cfg, space, train_fn=train_fn, log=log)
    else:
        trials = make_trials(cfg, space)
        configs = [trial_config(cfg, p, os.path.join(cfg.log.dir, f"trial_{i:03d}")) for i, p in enumerate(trials)]
        rows = run_trials(configs, trials, train_fn=train_fn, log=log, name="trial", hint="the space or seed changed")
    ranked = rank_results(rows, cfg.eval.metric, cfg.search.mode)
    table = format_table(ranked, cfg.eval.metric)
    if is_main_process():
        write_text(os.path.join(cfg.log.dir, "search.md"), f"# {cfg.search.method} search, {len(rows)} trials, "
                   f"ranked by {cfg.eval.metric} ({cfg.search.mode})\n\n{table}")
        write_json(os.path.join(cfg.log.dir, "search.json"),
                    {"metric": cfg.eval.metric, "mode": cfg.search.mode, "space": space, "ranked": ranked})
    log(table)
    return ranked


def run_trials(configs: list[Config], params: list[dict[str, Any]], *, train_fn: TrainFn | None = None,
               log: Callable[[str], None] = print, name: str = "trial", hint: str = "the settings changed") -> list[dict]:
    """Train ``configs[i]`` (its own log.dir) unless an earlier run finished it: a finished run leaves
    ``result.json`` holding its params and final metrics, so an interrupted sweep resumes where it stopped."""
    train_fn = train_fn or train_trial
    rows = []
    for i, (p, tcfg) in enumerate(zip(params, configs)):
        result_path = os.path.join(tcfg.log.dir, "result.json")
        if os.path.isfile(result_path):
            with open(result_path, encoding="utf-8") as f:
                done = json.load(f)
            if done.get("params") != _jsonable(p):
                raise UserError(f"{result_path} holds a {name} with other parameters ({done.get('params')}); {hint} "
                                 "— use a new log.dir or delete the old runs")
            log(f"{name} {i:03d}: finished earlier, skipped")
            rows.append(done)
            continue
        log(f"{name} {i:03d}/{len(configs)}: {p}")
        row = {"trial": i, "params": _jsonable(p), "metrics": train_fn(tcfg)}
        if is_main_process():
            os.makedirs(tcfg.log.dir, exist_ok=True)
            write_json(result_path, row)
        rows.append(row)
    return rows


def train_trial(cfg: Config) -> dict:
    from megatrain.train.trainer import Trainer

    return Trainer(cfg).run()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))
