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
             "the recipe's sections are merged over it key by key (lists are replaced whole).", ""]
    for section, field in Config.model_fields.items():
        model: type[BaseModel] = field.annotation
        lines += [f"## `{section}`", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for name, f in model.model_fields.items():
            default = f.default if f.default_factory is None else f.default_factory()
            lines.append(f"| `{section}.{name}` | {_type_name(f.annotation)} | `{default!r}` | {f.description or ''} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference())
