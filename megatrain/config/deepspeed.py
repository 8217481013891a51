"""``to_deepspeed``: the ds_config dict DeepSpeed's engine takes, generated from the config tree."""
from __future__ import annotations

import json
import os
from typing import Any

from megatrain.config.layout import Layout
from megatrain.config.loader import ConfigError
from megatrain.config.schema import Config


def to_deepspeed(cfg: Config, layout: Layout) -> dict[str, Any]:
    train, par = cfg.train, cfg.parallel
    ds: dict[str, Any] = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": train.grad_clip,
        "steps_per_print": 10**9,  # megatrain logs itself
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": par.zero_stage},
        # The optimizer is built by megatrain (ops.make_adamw); let ZeRO use it as given.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {
            "enabled": train.precision == "fp16",
            "loss_scale": 0,  # 0 = dynamic
            "initial_scale_power": 16,
            "loss_scale_window": train.loss_scale_window,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
    }
    if par.pp > 1 and par.sequence_parallel:
        # DeepSpeed's pipe partitioning slices activations over tp ranks assuming they are replicated there;
        # under sequence parallelism each tp rank holds a different sequence shard, already 1/tp in size.
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if par.offload_optimizer == "cpu":
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if train.deepspeed_config:
        ds = merge_user_deepspeed(ds, _read_json(train.deepspeed_config))
    return ds


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"train.deepspeed_config={path}: no such file")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ConfigError(f"train.deepspeed_config={path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"train.deepspeed_config={path}: top level must be a JSON object")
    return data


def merge_user_deepspeed(ours: dict, user: dict, prefix: str = "") -> dict:
    """Deep-merge a user's DeepSpeed JSON. Keys megatrain does not set are taken as given; a key that
    megatrain sets to a different value is a conflict (two sources of truth), reported with the field."""
    out = dict(ours)
    for key, value in user.items():
        name = f"{prefix}{key}"
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge_user_deepspeed(out[key], value, prefix=f"{name}.")
        elif out[key] != value and value != "auto":
            raise ConfigError(f"train.deepspeed_config sets {name}={value!r} but the megatrain config gives "
                              f"{out[key]!r}; set it in the megatrain config only (or 'auto' in the JSON)")
    return out
