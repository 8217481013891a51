"""``to_deepspeed``: the ds_config dict DeepSpeed's engine takes, generated from the config tree."""
from __future__ import annotations

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


# megatrain builds the optimizer (train.optimizer, ops.make_adamw) and the LR schedule (train.schedule) itself;
# a second one from the JSON would silently compete with them.
OWNED_BLOCKS = {"optimizer": "train.optimizer/lr/betas/eps/weight_decay",
                "scheduler": "train.schedule/warmup_steps/min_lr"}


def _read_json(path: str) -> dict:
    from megatrain.safe_io import read_json
    if not os.path.isfile(path):
        raise ConfigError(f"train.deepspeed_config={path}: no such file")
    data = read_json(path, what="train.deepspeed_config", fix="give a DeepSpeed JSON object file",
                     error=ConfigError)
    for block, fields in OWNED_BLOCKS.items():
        if block in data:
            raise ConfigError(f"train.deepspeed_config={path}: its {block!r} block is refused, megatrain builds "
                              f"the {block} itself; remove the block and set {fields} in the megatrain config")
    return data


def validate_deepspeed(ds: dict) -> None:
    """Run DeepSpeed's own config validation on the merged dict before any engine exists; its multi-line
    pydantic report becomes one line naming the first bad field."""
    import logging

    from pydantic import ValidationError
    from deepspeed.runtime.config import DeepSpeedConfig
    # DeepSpeedConfig checks train_batch_size against the world it sees (1 before any process group, every
    # rank after, tp and pp included): leave it out so DeepSpeed derives it from micro batch x accumulation;
    # megatrain's layout checked the product against the data-parallel size already.
    probe = {k: v for k, v in ds.items() if k != "train_batch_size"}
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.WARNING)
    try:
        DeepSpeedConfig(probe)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"train.deepspeed_config: {err.title}.{loc}: {first['msg']} (got "
                          f"{str(first.get('input'))[:60]!r}); fix the value in the JSON") from None
    except (AssertionError, ValueError, TypeError, KeyError, AttributeError) as err:
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise ConfigError(f"train.deepspeed_config: DeepSpeed refuses the merged config ({detail}); fix the "
                          "JSON") from None
    finally:
        ds_logger.setLevel(level)


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
