"""One typed config tree: schema, YAML + override loading, derived layout, DeepSpeed dict."""
from megatrain.config.deepspeed import merge_user_deepspeed, to_deepspeed
from megatrain.config.layout import Layout, resolve_layout
from megatrain.config.loader import ConfigError, build_config, dump_config, load_config, parse_overrides
from megatrain.config.schema import (CheckpointConfig, Config, DataConfig, EvalConfig, LogConfig, ModelConfig,
                                     ParallelConfig, SearchConfig, TrainConfig)

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "Layout", "LogConfig", "ModelConfig",
    "ParallelConfig", "SearchConfig", "TrainConfig", "build_config", "dump_config", "load_config",
    "merge_user_deepspeed", "parse_overrides", "resolve_layout", "to_deepspeed",
]
