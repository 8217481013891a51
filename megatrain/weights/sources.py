"""Where a model's weights come from, in one place: read a model (config + full tensors) from any source, write
plain models, and turn ``model.init_from`` into a tensor source for materialisation.

Sources, tried in this order by :func:`load_model_state`:
  - a compressed-model dir written by ``save_model`` (model.safetensors + config.yaml);
  - a local Hugging Face dir (config.json + *.safetensors), through megatrain.interop.hf_maps;
  - a megatrain checkpoint: a layout-free one (manifest.json) through megatrain.checkpoint.layout_free, an
    older DeepSpeed one from its tp=1 ``mp_rank_00_model_states.pt`` read by megatrain.safe_io (tensors only, never code).
A run dir (holding checkpoints/), a checkpoints dir (holding ``latest``) and one step dir are all accepted.
A fresh model's weights come from the name-seeded init (``megatrain.parallelize.materialize.InitSource``); a Hugging
Face directory given as ``model.from_hf`` is read by ``megatrain.interop.hf`` one tensor at a time.
"""
from __future__ import annotations

import glob
import os

import torch
import yaml

from megatrain.config.schema import ModelConfig
from megatrain.fsutil import atomic_write_text
from megatrain.errors import CheckpointError, UserError
from megatrain.safe_io import load_safetensors, read_yaml_model

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.yaml"


def save_model(out_dir: str, model: torch.nn.Module, model_cfg: ModelConfig, *, extra: dict | None = None) -> str:
    """Write ``model`` (plain, unsharded) as safetensors + the model section as YAML; returns out_dir."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model_cfg.tied:  # safetensors refuses shared storage; the tie is restored from the config on load
        state.pop(tied_keys(model_cfg)[0], None)
    tmp = os.path.join(out_dir, f".{MODEL_FILE}.tmp")
    save_file(state, tmp)
    os.replace(tmp, os.path.join(out_dir, MODEL_FILE))
    doc = {"model": model_cfg.model_dump(mode="json"), **(extra or {})}
    atomic_write_text(os.path.join(out_dir, CONFIG_FILE), yaml.safe_dump(doc, sort_keys=False))
    return out_dir


def _step_dir(path: str) -> str | None:
    """The checkpoint step dir a run dir / checkpoints dir / step dir points at, or None."""
    for cand in (path, os.path.join(path, "checkpoints")):
        if any(os.path.isfile(os.path.join(cand, f)) for f in ("megatrain.json", "manifest.json")):
            return cand
        if os.path.isfile(os.path.join(cand, "latest")):
            with open(os.path.join(cand, "latest"), encoding="utf-8") as f:
                return os.path.join(cand, f.read().strip())
    return None


def _from_deepspeed(step_dir: str) -> tuple[ModelConfig, dict]:
    from megatrain.safe_io import load_legacy_module_state, read_json
    meta_path = os.path.join(step_dir, "megatrain.json")
    meta = read_json(meta_path, what="checkpoint metadata", fix="was it saved by megatrain?", error=CheckpointError)
    if not isinstance(meta.get("config"), dict) or not isinstance(meta["config"].get("model"), dict):
        raise CheckpointError(f"checkpoint metadata {meta_path}: no 'config.model' object; was it saved by megatrain?")
    model_cfg = ModelConfig(**meta["config"]["model"])
    files = sorted(glob.glob(os.path.join(step_dir, "mp_rank_*_model_states.pt")))
    if len(files) != 1:
        raise UserError(f"{step_dir}: {len(files)} model-state files (a tp/pp>1 DeepSpeed checkpoint); these passes "
                         "read tp=1 pp=1 checkpoints until the layout-free loader lands; re-save with tp=1")
    state = load_legacy_module_state(files[0])
    if not state:
        raise UserError(f"{step_dir}: no module weights in the DeepSpeed checkpoint (ZeRO-3 partitions them); "
                         "save with parallel.zero_stage<=2 or convert with zero_to_fp32")
    return model_cfg, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _from_hf(path: str) -> tuple[ModelConfig, dict]:
    from megatrain.interop.hf_maps import from_hf_state, model_fields_from_hf
    from megatrain.safe_io import read_json
    hf_cfg = read_json(os.path.join(path, "config.json"), what="Hugging Face config",
                       fix="pass a local Hugging Face model directory", error=CheckpointError)
    model_cfg = ModelConfig(**model_fields_from_hf(hf_cfg))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise UserError(f"{path}: Hugging Face dir without *.safetensors; save it with safe_serialization=True")
    hf_state: dict = {}
    for f in files:
        hf_state.update(load_safetensors(f))
    return model_cfg, from_hf_state({k: v.float() for k, v in hf_state.items()}, model_cfg)


def load_model_state(path: str) -> tuple[ModelConfig, dict]:
    """(model config, full state dict) from any accepted source; a one-line UserError otherwise."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such directory; pass a run/checkpoint dir, a pruned model dir or an HF dir")
    if os.path.isfile(os.path.join(path, MODEL_FILE)) and os.path.isfile(os.path.join(path, CONFIG_FILE)):
        doc = read_yaml_model(os.path.join(path, CONFIG_FILE))
        model_cfg = ModelConfig(**doc["model"])
        state = load_safetensors(os.path.join(path, MODEL_FILE))
        if model_cfg.tied:
            head, embed = tied_keys(model_cfg)
            state[head] = state[embed]
        return model_cfg, state
    if os.path.isfile(os.path.join(path, "config.json")):
        return _from_hf(path)
    step = _step_dir(path)
    if step is None:
        raise UserError(f"{path}: not a model (no model.safetensors+config.yaml, config.json or a checkpoint); "
                         "pass a run/checkpoint dir, a pruned model dir or an HF dir")
    if os.path.isfile(os.path.join(step, "manifest.json")):  # layout-free checkpoint: any saved layout
        from megatrain.checkpoint.layout_free import load_model_state as layout_free
        cfg, state = layout_free(step)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        if cfg.model.tied:
            head, embed = tied_keys(cfg.model)
            state.setdefault(head, state[embed])
        if cfg.model.lora.enabled:  # a LoRA run's weights are its base with the adapters merged (a plain model)
            from megatrain.config.schema import LoraConfig
            from megatrain.parallelize.lora import merge_lora_state
            return cfg.model.model_copy(update={"lora": LoraConfig()}), merge_lora_state(state, cfg.model.lora)
        return cfg.model, state
    return _from_deepspeed(step)


def tied_keys(model_cfg: ModelConfig) -> tuple[str, str]:
    """(LM head, embedding) state-dict keys of a model whose head shares the embedding."""
    return ("head.lm_head.weight", "embed.wte.weight") if model_cfg.is_transformer else ("lm_head.weight",
                                                                                          "embed.weight")


def build_plain(model_cfg: ModelConfig, state: dict | None = None, *, seed: int = 0) -> torch.nn.Module:
    """The plain model of ``model_cfg`` (any arch), loaded strictly from ``state`` when given. A ResNet's stem
    is read from the state (its config does not record it); RNNs are LMs or classifiers by model.task."""
    from megatrain.models.build import build_model
    from megatrain.models.cnn import resnet_stem
    stem = resnet_stem(state) if model_cfg.arch == "resnet" and state is not None else "small"
    model = build_model(model_cfg, seed=seed, stem=stem)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


def load_model(path: str, *, seed: int = 0) -> tuple[torch.nn.Module, ModelConfig]:
    """A plain model (Transformer, ResNet, LSTM/GRU) with the weights from ``path`` (strict: every tensor
    must match the config)."""
    model_cfg, state = load_model_state(path)
    return build_plain(model_cfg, state, seed=seed), model_cfg


def init_source(model_cfg):
    """The weights of ``model.init_from`` as a tensor source, after checking its sizes equal the config's."""
    from megatrain.checkpoint.layout_free import SHAPE_FIELDS
    from megatrain.parallelize.materialize import StateSource

    path = model_cfg.init_from
    try:
        saved, state = load_model_state(path)
    except UserError as err:  # name the field the path came from
        raise UserError(f"model.init_from={path}: {str(err).removeprefix(f'{path}: ')}") from None
    # compare what the fields mean (num_kv_heads None = num_heads, ...), not how they were written
    derived = {"num_kv_heads": "kv_heads", "head_dim": "attn_head_dim", "tie_embeddings": "tied",
               "ffn_hidden_size": "ffn_size", "inner_widths": "stage_inner_widths", "rnn_hidden_size": "rnn_width"}
    for field in SHAPE_FIELDS:
        key = derived.get(field, field)
        if getattr(saved, key) != getattr(model_cfg, key):
            value = getattr(saved, key)
            arg = str(value).replace(" ", "") if not isinstance(value, bool) else str(value).lower()
            raise UserError(f"model.init_from={path} holds a model with model.{field}={value!r} but the config has "
                             f"{getattr(model_cfg, key)!r}; pass --model.{field}={arg} (the saved config.yaml "
                             "lists all sizes)")
    return StateSource(state, f"model.init_from={path}")
