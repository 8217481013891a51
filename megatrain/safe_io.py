"""Readers of input files that never execute what they read, and fail in one line naming the file.

Every file megatrain reads from a user's directory (checkpoint, saved model, Hugging Face dir, teacher cache,
prepared data) is JSON, YAML (``safe_load``), safetensors or raw arrays. The one exception is the older
per-engine DeepSpeed checkpoint (``*model_states.pt``): it is read by :func:`load_legacy_module_state` with
PyTorch's restricted unpickler (``weights_only=True``: tensors and plain containers, never a callable), and
anything else in it is refused. tests/unit/test_no_pickle.py forbids any other unpickling in the source tree."""
from __future__ import annotations

import json
import os
import re

from megatrain.errors import CheckpointError, UserError


def read_json(path: str, *, what: str, fix: str, error: type[UserError] = UserError,
              mapping: bool = True):
    """The JSON document at ``path``; any unreadable, non-UTF-8 or invalid file (or, with ``mapping``, a
    top level that is not an object) is one ``error`` line: "<what> <path>: <problem>; <fix>"."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise error(f"{what} {path}: cannot be read ({err.strerror or err}); {fix}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise error(f"{what} {path}: not UTF-8 text (a binary or foreign file); {fix}") from None
    except json.JSONDecodeError as err:
        raise error(f"{what} {path}: not valid JSON (line {err.lineno}: {err.msg}); {fix}") from None
    except RecursionError:
        raise error(f"{what} {path}: JSON nested too deeply; {fix}") from None
    if mapping and not isinstance(doc, dict):
        raise error(f"{what} {path}: top level is a {type(doc).__name__}, not a JSON object; {fix}")
    return doc


def require_keys(doc: dict, keys: tuple[str, ...], *, what: str, path: str, fix: str,
                 error: type[UserError] = UserError) -> None:
    """One line naming the first of ``keys`` missing from ``doc``."""
    for key in keys:
        if key not in doc:
            raise error(f"{what} {path}: no {key!r} field; {fix}")


def load_legacy_module_state(path: str) -> dict:
    """``["module"]`` of an older DeepSpeed ``*model_states.pt`` through the restricted unpickler; a file that
    holds anything but tensors and plain containers (e.g. a pickled callable) is refused in one line and
    nothing in it runs."""
    import pickle

    import torch
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, AttributeError, ValueError, TypeError,
            KeyError, IndexError, UnicodeDecodeError) as err:
        # torch's own text goes on to explain how to load it unsafely; keep only what it found
        found = re.search(r"Unsupported (global|operand)[^\n]*?(?=\. |\n|$)", str(err))
        first = found.group(0)[:120] if found else type(err).__name__
        raise CheckpointError(f"checkpoint file {path}: refused, it is not a plain tensor file ({first}); "
                              "megatrain never runs code from a checkpoint - re-save it with megatrain") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("module"), dict):
        raise CheckpointError(f"checkpoint file {path}: no 'module' state dict in it; re-save it with megatrain")
    state = blob["module"]
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint file {path}: 'module' holds non-tensor values; re-save it with megatrain")
    return state


def load_safetensors(path: str) -> dict:
    """All tensors of a safetensors file; a file that is not one (e.g. a pickle renamed) is one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise CheckpointError(f"{path}: not a readable safetensors file ({first}); re-save it with "
                              "safetensors") from None


def read_yaml_model(path: str) -> dict:
    """A saved model's config.yaml (safe YAML, bounded size) with its ``model`` section."""
    from megatrain.config.loader import safe_yaml
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
    except OSError as err:
        raise CheckpointError(f"saved model config {path}: cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"saved model config {path}: not UTF-8 text; re-save the model with megatrain") from None
    try:
        doc = safe_yaml(text, f"saved model config {path}")
    except UserError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise CheckpointError(f"saved model config {path}: no 'model' section; re-save the model with megatrain")
    return doc
