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
        out[key] = _typed(raw, key)
        i += 1
    return out


MAX_RECIPE_BYTES = 1 << 20   # a recipe is a page of YAML; anything larger is not one
MAX_YAML_NODES = 100_000     # nodes after expanding aliases: bounds "billion laughs" before anything walks it
MAX_INT_DIGITS = 30          # longer integer literals are typos (and Python refuses > 4300 digits anyway)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader (no Python tags, nothing executed) that refuses integer literals longer than
    MAX_INT_DIGITS; the alias-expanded size is checked on the composed node graph by :func:`safe_yaml`."""


def _bounded_int(loader: _BoundedLoader, node: yaml.ScalarNode):
    digits = node.value.replace("_", "").lstrip("+-")
    if len(digits) > MAX_INT_DIGITS:
        raise yaml.constructor.ConstructorError(None, None, f"integer literal of {len(digits)} digits is too large",
                                                node.start_mark)
    return yaml.SafeLoader.construct_yaml_int(loader, node)


def _no_binary(loader: _BoundedLoader, node: yaml.Node):
    raise yaml.constructor.ConstructorError(None, None, "!!binary values are not config values", node.start_mark)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _bounded_int)
_BoundedLoader.add_constructor("tag:yaml.org,2002:binary", _no_binary)


def _expanded_nodes(node: yaml.Node, limit: int) -> int:
    """Nodes the document would have with every alias copied out, computed once per distinct node (memo), so
    a nested alias bomb is measured, not expanded; stops counting past ``limit``."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        sizes[id(n)] = 1  # a recursive alias counts once; SafeLoader builds such a cycle lazily
        if isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(c) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in n.value)
        else:
            total = 1
        sizes[id(n)] = total = min(total, limit + 1)
        return total

    return size(node)


def safe_yaml(text: str | bytes, where: str) -> Any:
    """The YAML document in ``text`` (safe types only), with its size bounded before it is constructed:
    at most MAX_RECIPE_BYTES of input and MAX_YAML_NODES nodes after alias expansion. ``where`` names the
    file or override in the one-line :class:`ConfigError`."""
    if len(text) > MAX_RECIPE_BYTES:
        raise ConfigError(f"{where}: {len(text)} bytes is too large for a recipe (limit {MAX_RECIPE_BYTES}); "
                          "is this the right file?")
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise ConfigError(f"{where}: YAML expands to more than {MAX_YAML_NODES} nodes through aliases "
                              "(&anchor/*alias); write the values out or use fewer aliases")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())
        raise ConfigError(f"{where}: not valid YAML ({detail}); fix the syntax") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply; flatten it") from None
    finally:
        loader.dispose()


def _typed(raw: str, key: str = "") -> Any:
    if raw == "":
        return ""
    value = safe_yaml(raw, f"override --{key}" if key else "override")
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


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        section = ".".join(str(p) for p in first["loc"][:-1]) or "top level"
        return f"unknown config key {loc!r}; check the spelling (valid keys in {section}: see docs/config.md)"
    if loc and not msg.startswith(loc.split(".")[0]):
        got = first.get("input")
        got = "" if isinstance(got, dict) else f" (got {_short(got)})"
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


def _read_text(path: str, what: str) -> str:
    """The recipe's text: unreadable, oversized, binary and non-UTF-8 files are one line naming the file."""
    try:
        size = os.path.getsize(path)
        if size > MAX_RECIPE_BYTES:
            raise ConfigError(f"{what} {path}: {size} bytes is too large for a recipe (limit {MAX_RECIPE_BYTES}); "
                              "is this the right file?")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ConfigError(f"{what} {path}: cannot be read ({err.strerror or err}); check its permissions") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark is harmless
    if b"\x00" in raw:
        raise ConfigError(f"{what} {path}: holds NUL bytes (binary or UTF-16); save the recipe as UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path}: not UTF-8 (byte {err.start}); save the recipe as UTF-8 text") from None


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
    tree = safe_yaml(_read_text(path, "base: recipe" if chain else "--config"),
                     f"{'base: recipe' if chain else '--config'} {path}") or {}
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
