"""YAML recipe + ``--section.key=value`` overrides → validated :class:`Config`, errors on one line."""
from __future__ import annotations

import os
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from megatrain.config.schema import Config


from megatrain.errors import ConfigError  # noqa: F401 (re-exported: megatrain.config.ConfigError)


def parse_overrides(args: Iterable[str]) -> dict[str, Any]:
    """``["--train.lr=1e-3", "--parallel.tp", "2"]`` → ``{"train.lr": 0.001, "parallel.tp": 2}``."""
    out: dict[str, Any] = {}
    args = list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unrecognised argument {arg!r}; overrides look like --section.key=value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {arg!r} has no value; write {arg}=VALUE")
        # YAML typing: 2 → int, 1e-3 → float, true → bool, [1,2] → list, null → None
        out[key] = _typed(raw)
        i += 1
    return out


def _typed(raw: str) -> Any:
    if raw == "":
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string; numbers should be numbers
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override --{key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        section = ".".join(str(p) for p in first["loc"][:-1]) or "top level"
        return f"unknown config key {loc!r}; check the spelling (valid keys in {section}: see docs/config.md)"
    if loc and not msg.startswith(loc.split(".")[0]):
        got = first.get("input")
        got = "" if isinstance(got, dict) else f" (got {got!r})"
        return f"{loc}: {msg}{got}"
    return msg


def build_config(tree: dict | None = None, overrides: dict[str, Any] | None = None) -> Config:
    tree = dict(tree or {})
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def _merge(base: dict, child: dict) -> dict:
    """Child values win; sections merge key by key; lists and scalars are replaced whole."""
    out = dict(base)
    for key, value in child.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_recipe(path: str, chain: tuple[str, ...] = ()) -> dict:
    """A recipe's tree; ``base: other.yaml`` (relative to the recipe) is read first and overlaid, so a variant
    recipe states only what it changes."""
    if not os.path.isfile(path):
        hint = f"base: of {chain[-1]}" if chain else "--config"
        raise ConfigError(f"{hint} {path}: no such file; pass a recipe such as recipes/tiny_cpu_gpt.yaml")
    real = os.path.realpath(path)
    if real in chain:
        raise ConfigError(f"--config {path}: base: recipes form a cycle ({' -> '.join(chain + (real,))}); "
                          "remove one base: line")
    with open(path, encoding="utf-8") as f:
        try:
            tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {path}: not valid YAML ({err.__class__.__name__}: {err})".replace("\n", " ")) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"--config {path}: top level must be a mapping of sections (model:, train:, ...)")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"--config {path}: base must be the path of another recipe (got {base!r})")
    return _merge(_read_recipe(os.path.join(os.path.dirname(path), base), chain + (real,)), tree)


def load_config(path: str | None, overrides: dict[str, Any] | Iterable[str] | None = None) -> Config:
    """Read a YAML recipe (or defaults when ``path`` is None) and apply overrides."""
    tree = _read_recipe(path) if path is not None else {}
    if overrides is not None and not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    return build_config(tree, overrides)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
