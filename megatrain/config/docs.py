"""Generate the config reference (docs/config.md) from the pydantic models: the models are the truth."""
from __future__ import annotations

import typing

from pydantic import BaseModel

from megatrain.config.schema import Config


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(annotation))
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _type_name(args[0]) + " or null" if len(args) == 1 else " \\| ".join(_type_name(a) for a in args)
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))


def config_reference() -> str:
    lines = ["# Config reference", "",
             "Generated from `megatrain/config/schema.py` by `megatrain config-docs`; do not edit by hand.",
             "Every field can be set in a YAML recipe or overridden on the command line as `--section.key=value`.",
             "A recipe may start with `base: other.yaml` (a path relative to the recipe): the base is read first and "
             "the recipe's sections are merged over it key by key (lists are replaced whole).", "",
             "Input rules (each violation is one line naming the file or field, exit 2, before any process group): "
             "a recipe is UTF-8 text of at most 1 MiB (a NUL byte, UTF-16/32 or other encodings are refused); it is "
             "read with a safe YAML loader (no Python tags, no `!!binary`) whose size after expanding "
             "`&anchor`/`*alias` is bounded to 100,000 nodes before anything walks it (an alias bomb is refused "
             "at once); integer literals longer than 30 digits and integers above 2^53 are refused; float fields "
             "must be finite (`inf`/`nan` refused); `true`/`false` are not numbers; `train.seed`/`data.split_seed` "
             "are in [0, 2^31); `train.global_batch_size` <= 2^24, `train.micro_batch_size` <= 2^20, "
             "`model.max_seq_len`/`data.seq_len` <= 2^22, `model.vocab_size` <= 2^24. The same YAML rules apply to "
             "override values. `model.rope_scaling` is checked for llama only (types default, linear, llama3, "
             "with their factors). Training launchers then check, before any process group: the `WORLD_SIZE` the "
             "launcher exported, `model.kernels`/`kernel_overrides` naming triton or cuda on a machine without "
             "CUDA, `log.dir`/`checkpoint.dir`/`checkpoint.export_hf` (a file, or under a file, or not writable), "
             "and the merged DeepSpeed config (`train.deepspeed_config` is validated by DeepSpeed's own schema; "
             "an `optimizer` or `scheduler` block in it is refused, megatrain builds both). See "
             "`megatrain/config/preflight.py` and `tests/unit/test_bad_input_fuzz.py`.", ""]
    for section, field in Config.model_fields.items():
        lines += [f"## `{section}`", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        lines += _rows(section, field.annotation)
        lines.append("")
    return "\n".join(lines)


def _rows(prefix: str, model: type[BaseModel]) -> list[str]:
    """One table row per field; a nested section (model.lora) gets a row per field of its own."""
    rows = []
    for name, f in model.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            rows += _rows(f"{prefix}.{name}", f.annotation)
            continue
        default = f.default if f.default_factory is None else f.default_factory()
        rows.append(f"| `{prefix}.{name}` | {_type_name(f.annotation)} | `{default!r}` | {f.description or ''} |")
    return rows


if __name__ == "__main__":
    print(config_reference())
