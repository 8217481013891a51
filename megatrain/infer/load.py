"""One loader for inference: a model, its tokenizer and its ModelConfig from any of the three places a trained
model lives.

  - a megatrain checkpoint: a run dir, its ``checkpoints`` dir or one ``step_XXXXXXXX`` dir (layout-free
    ``manifest.json``, or an older tp=1 DeepSpeed step); the tokenizer is the one of the run's ``data.path``
    (the prepared dir keeps a copy) or its ``data.tokenizer``;
  - a saved model dir (``model.safetensors`` + ``config.yaml``, megatrain.weights.save_model): the tokenizer
    is one stored beside it, else the one of the model it was pruned or distilled from;
  - a local Hugging Face dir (``config.json`` + safetensors): the tokenizer saved in the same dir.

Transformers are built on the meta device and then materialised on the target device one tensor at a time
(``parallelize.materialize``), so every parameter is real and tied weights stay one tensor; ``load_state_dict``
into meta parameters would silently keep them meta. The model comes back in eval mode.

    loaded = load_for_inference("runs/tiny", device="cuda", dtype=torch.bfloat16)
    loaded.model, loaded.tokenizer, loaded.model_cfg
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from megatrain.config.schema import Config, ModelConfig
from megatrain.data.tokenizer import Tokenizer
from megatrain.errors import CheckpointError, DataError, UserError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module  # plain, unsharded, eval mode, on ``device``
    model_cfg: ModelConfig
    tokenizer: Tokenizer | None  # None only when none was found and ``need_tokenizer=False``
    kind: str  # "checkpoint" | "saved" | "hf"
    path: str
    config: Config | None = None  # the run's whole config (checkpoints only): its data.path, seq_len, ...

    @property
    def eos_ids(self) -> list[int]:
        """Ids that end a generation: the tokenizer's EOS, then those a Hugging Face dir's generation_config.json
        and config.json name (a chat model's end-of-turn token is often only there)."""
        ids = [self.tokenizer.eos_id] if self.tokenizer is not None else []
        if self.kind == "hf":
            for name in ("generation_config.json", "config.json"):
                ids += _eos_of(os.path.join(self.path, name))
        return list(dict.fromkeys(ids))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _eos_of(path: str) -> list[int]:
    if not os.path.isfile(path):
        return []
    from megatrain.safe_io import read_json
    doc = read_json(path, what="Hugging Face config", fix="re-save the model directory", error=CheckpointError)
    eos = doc.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    return [int(e) for e in eos if isinstance(e, int) and not isinstance(e, bool)]


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"--dtype={name}: not one of {', '.join(sorted(set(DTYPES)))}")
    return DTYPES[name]


def default_device() -> torch.device:
    """This process's GPU (LOCAL_RANK under a launcher), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))


def model_kind(path: str) -> str:
    """Which of the three kinds ``path`` is; a one-line error naming what was looked for otherwise."""
    from megatrain.weights.sources import CONFIG_FILE, MODEL_FILE, _step_dir
    if not os.path.isdir(path):
        raise UserError(f"model {path}: no such directory; pass a run/checkpoint dir, a saved model dir or a "
                        "Hugging Face model dir")
    if os.path.isfile(os.path.join(path, MODEL_FILE)) and os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return "saved"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    if _step_dir(path) is not None:
        return "checkpoint"
    raise UserError(f"model {path}: not a model (no model.safetensors+config.yaml, config.json, manifest.json or "
                    "checkpoints/latest); pass a run/checkpoint dir, a saved model dir or a Hugging Face model dir")


def load_for_inference(path: str, *, device: str | torch.device | None = None,
                       dtype: str | torch.dtype = torch.float32, tokenizer: str | None = None,
                       need_tokenizer: bool = True) -> LoadedModel:
    """The model at ``path`` (any kind, see the module doc) on ``device`` (default: this process's GPU, else
    CPU) in ``dtype``, with its tokenizer (``tokenizer`` overrides where it is read from)."""
    path = os.path.expanduser(path)
    kind = model_kind(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype)
    config = None
    if kind == "hf":
        from megatrain.interop.hf import HFSource, model_config_from_hf
        model_cfg = model_config_from_hf(path)
        source, state = HFSource(path, model_cfg), None  # checks every tensor before anything is built
    elif kind == "saved":
        from megatrain.weights.sources import load_model_state
        model_cfg, state = load_model_state(path)
        source = None
    else:
        config, model_cfg, source, state = _checkpoint(path)
    model = _build(model_cfg, source, state, device=device, dtype=dtype, origin=path)
    tok = _tokenizer(kind, path, config, override=tokenizer, need=need_tokenizer)
    if tok is not None and model_cfg.is_transformer and tok.vocab_size > model_cfg.vocab_size:
        raise DataError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model {path} only "
                        f"{model_cfg.vocab_size}; pass the tokenizer it was trained with (--tokenizer)")
    return LoadedModel(model, model_cfg, tok, kind, path, config)


def _step(path: str) -> str:
    from megatrain.weights.sources import _step_dir
    step = _step_dir(path)
    if step is None:
        raise CheckpointError(f"{path}: no checkpoint in it (no manifest.json, megatrain.json or latest); did the "
                              "run save one (checkpoint.save_final=true)?")
    return step


def checkpoint_config(path: str) -> Config:
    """The whole Config a megatrain checkpoint (run dir, checkpoints dir or step dir) was saved with."""
    from megatrain.config import build_config
    step = _step(path)
    if os.path.isfile(os.path.join(step, "manifest.json")):
        from megatrain.checkpoint.store import read_manifest
        doc = read_manifest(step)
        where = os.path.join(step, "manifest.json")
    else:
        from megatrain.safe_io import read_json
        where = os.path.join(step, "megatrain.json")
        doc = read_json(where, what="checkpoint metadata", fix="was it saved by megatrain?", error=CheckpointError)
    if not isinstance(doc.get("config"), dict):
        raise CheckpointError(f"checkpoint metadata {where}: no 'config' object; was it saved by megatrain?")
    return build_config(doc["config"])


def _checkpoint(path: str):
    """(Config, ModelConfig, tensor source or None, full state or None) of a megatrain checkpoint."""
    step = _step(path)
    config = checkpoint_config(step)
    if os.path.isfile(os.path.join(step, "manifest.json")) and config.model.lora.enabled:
        # a LoRA run: its base with the adapters merged, a plain model (the whole state is read to merge)
        from megatrain.weights.sources import load_model_state
        model_cfg, state = load_model_state(step)
        return config, model_cfg, None, state
    if os.path.isfile(os.path.join(step, "manifest.json")):  # layout-free: read one tensor at a time
        from megatrain.checkpoint.store import CheckpointSource, read_manifest
        source = CheckpointSource(step, read_manifest(step), prefix="model", verify=True)
        return config, config.model, source, None
    from megatrain.weights.sources import load_model_state
    model_cfg, state = load_model_state(step)  # older DeepSpeed layout: tp=1 model states, tensors only
    return config, model_cfg, None, state


def _build(model_cfg: ModelConfig, source, state: dict | None, *, device, dtype, origin: str) -> nn.Module:
    from megatrain.weights.sources import build_plain, tied_keys
    if not model_cfg.is_transformer:  # ResNet / RNN: small, built for real and loaded strictly (buffers too)
        if state is None:
            from megatrain.weights.sources import load_model_state
            _, state = load_model_state(origin)  # restores a tied head the checkpoint stores once
        return build_plain(model_cfg, state).to(device=device, dtype=dtype).eval()
    from megatrain.models.build import build_model
    from megatrain.parallelize.materialize import StateSource, materialize_
    from megatrain.parallelize.param_spec import tag_logical_names
    if source is None:
        source = StateSource(state, f"model {origin}")
    model = build_model(model_cfg, meta=True)
    tag_logical_names(model)  # the tied head is named once, as the embedding: it is read (and kept) once
    expected = {name for name, _ in model.named_parameters()}
    held = set(getattr(source, "where", None) or (state or {}))
    if held:
        extra = sorted(held - expected - {tied_keys(model_cfg)[0]})
        if extra:
            raise CheckpointError(f"model {origin} holds tensor {extra[0]!r} ({len(extra)} unused) that its "
                                  "config's model does not have; was it written by another megatrain version?")
    materialize_(model, source, tp_rank=0, tp_size=1, device=device, dtype=dtype)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:  # a bug, not bad input: every parameter must have been read
        raise RuntimeError(f"load_for_inference: {still_meta[0]} is still on the meta device")
    return model.eval()


# ---- tokenizers -------------------------------------------------------------------------------------------
def _tokenizer(kind: str, path: str, config: Config | None, *, override: str | None, need: bool):
    from megatrain.data.tokenizer import load_tokenizer
    where = override or tokenizer_location(kind, path, config)
    if where is None:
        if not need:
            return None
        raise DataError(f"model {path}: no tokenizer found beside it or in the run it came from; pass one with "
                        "--tokenizer (a sentencepiece .model, an HF tokenizer dir or a prepared data dir)")
    return load_tokenizer(where)


def tokenizer_location(kind: str, path: str, config: Config | None = None) -> str | None:
    """Where the tokenizer of the model at ``path`` is read from, or None when none is recorded."""
    if _has_tokenizer(path):
        return path
    if kind == "checkpoint" and config is not None:
        for cand in (config.data.path, config.data.tokenizer):
            if cand and os.path.exists(cand) and (os.path.isfile(cand) or _has_tokenizer(cand)):
                return cand
        return None
    if kind == "saved":
        from megatrain.safe_io import read_yaml_model
        from megatrain.weights.sources import CONFIG_FILE
        doc = read_yaml_model(os.path.join(path, CONFIG_FILE))
        for key in ("pruned_from", "distilled_from"):  # a compressed model speaks its source's tokens
            src = doc.get(key)
            if isinstance(src, str) and os.path.isdir(src):
                try:
                    kind = model_kind(src)
                    return tokenizer_location(kind, src, checkpoint_config(src) if kind == "checkpoint" else None)
                except UserError:
                    return None
    return None


def _has_tokenizer(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in (
        "meta.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
