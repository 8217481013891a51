"""Write a Hugging Face directory: weights (sharded with an index above a size), config.json,
generation_config.json (bos/eos/pad ids) and the tokenizer files, in a chosen dtype.

Everything is written and fsynced in a temp directory beside the target first. A new (or empty) target is
then one rename. An existing non-empty target is refused unless ``overwrite=True``; then only model files
(``MODEL_FILES`` and the tokenizer files being written) are replaced, each by an atomic rename, and every
other file (a README, a tokenizer not being replaced, training notes) stays.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil

import torch

from megatrain.config.schema import ModelConfig
from megatrain.errors import CheckpointError
from megatrain.fsutil import fsync_dir
from megatrain.interop.hf_maps import hf_config_from_model, to_hf_state
from megatrain.parallelize.lora import merge_lora_state

SHARD_BYTES = 2 * 1024**3  # split exported weights into files of at most this size, like transformers
MODEL_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "config.json",
               "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_export_target(path: str, *, overwrite: bool, field: str = "checkpoint.export_hf") -> None:
    """Refuse a non-empty target unless overwriting was asked for (checked before training, and again at export)."""
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise CheckpointError(f"{field}={path} is a non-empty directory; choose a new directory or set "
                              "--checkpoint.export_overwrite=true to replace only its model files")
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{field}={path} exists and is not a directory; choose another path")


def tokenizer_files(source: str | None) -> dict[str, str]:
    """{file name in the export: path} of the tokenizer in ``source``: a prepared data dir (its copy of the
    tokenizer), an HF tokenizer dir, or a sentencepiece .model file. None/unknown → {}."""
    if not source or not os.path.exists(source):
        return {}
    if os.path.isfile(source):
        return {"tokenizer.model": source} if source.endswith(".model") else {}
    meta = os.path.join(source, "meta.json")
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            return tokenizer_files(os.path.join(source, json.load(f)["tokenizer"]["path"]))
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
             "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.txt")
    return {n: os.path.join(source, n) for n in names if os.path.isfile(os.path.join(source, n))}


def _special_ids(cfg: ModelConfig, tok_source: str | None) -> dict:
    ids = {f"{k}_token_id": v for k, v in cfg.hf_special.items()}
    if tok_source and not ids:  # a model trained here: the ids of the tokenizer it was trained with
        from megatrain.data.tokenizer import load_tokenizer
        try:
            tok = load_tokenizer(tok_source)
        except ValueError:
            return ids
        ids = {f"{k}_token_id": getattr(tok, f"{k}_id") for k in ("bos", "eos", "pad")
               if getattr(tok, f"{k}_id") is not None}
    return ids


def _generation_config(cfg: ModelConfig, ids: dict) -> dict:
    base = {}
    src = os.path.join(cfg.from_hf, "generation_config.json") if cfg.from_hf else None
    if src and os.path.isfile(src):  # keep the source model's sampling defaults
        with open(src, encoding="utf-8") as f:
            base = json.load(f)
    return {"_from_model_config": not base} | base | {k: v for k, v in ids.items() if k not in base}


def _shards(hf_state: dict, max_shard_bytes: int) -> list[dict]:
    shards, current, size = [], {}, 0
    for name, t in hf_state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.contiguous()
        size += nbytes
    return shards + [current]


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


def save_state_pretrained(state: dict[str, torch.Tensor], cfg: ModelConfig, path: str, *,
                          max_shard_bytes: int = SHARD_BYTES, dtype: str | None = None, overwrite: bool = False,
                          tokenizer: str | None = None) -> str:
    """Write a full megatrain state dict as an HF directory at ``path``; LoRA adapters are merged into their
    base weights.

    ``dtype``: float32 | bfloat16 | float16; None = the source's (``model.hf_dtype``), else float32.
    ``tokenizer``: where the tokenizer files come from (a prepared data dir, an HF tokenizer dir, a .model)."""
    from safetensors.torch import save_file
    path = os.path.abspath(path)
    check_export_target(path, overwrite=overwrite)
    dtype = dtype or cfg.hf_dtype or "float32"
    if dtype not in DTYPES:
        raise CheckpointError(f"checkpoint.export_dtype={dtype} is not one of {', '.join(DTYPES)}")
    state = merge_lora_state(state, cfg.lora)  # a LoRA model exports as its base with W + (alpha/r)·B A
    if cfg.tied and "head.lm_head.weight" not in state:
        state = {**state, "head.lm_head.weight": state["embed.wte.weight"]}
    hf_state = {k: v.to(DTYPES[dtype]) for k, v in to_hf_state(state, cfg).items()}
    if cfg.tied:
        hf_state.pop("lm_head.weight", None)  # transformers re-ties it from the embedding
    ids = _special_ids(cfg, tokenizer)
    hf_config = hf_config_from_model(cfg) | ids | {"dtype": dtype}
    tmp = f"{path}.tmp-export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards = _shards(hf_state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            total += sum(t.numel() * t.element_size() for t in shard.values())
        _write_json(os.path.join(tmp, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(os.path.join(tmp, "config.json"), hf_config)
    _write_json(os.path.join(tmp, "generation_config.json"), _generation_config(cfg, ids))
    for name, src in tokenizer_files(tokenizer).items():
        shutil.copyfile(src, os.path.join(tmp, name))
    for fname in os.listdir(tmp):
        with open(os.path.join(tmp, fname), "rb+") as f:
            os.fsync(f.fileno())
    if not os.path.isdir(path) or not os.listdir(path):
        if os.path.isdir(path):
            os.rmdir(path)
        os.replace(tmp, path)
    else:
        _replace_model_files(tmp, path)
    fsync_dir(os.path.dirname(path))
    return path


def _replace_model_files(tmp: str, path: str) -> None:
    """Move every file of ``tmp`` over ``path`` (atomic per file), then drop stale weight files of ``path``
    that the new export does not have (old shards would otherwise sit next to the new ones)."""
    new = set(os.listdir(tmp))
    weights_first = sorted(new, key=lambda n: (not n.endswith(".safetensors"), n == "config.json"))
    for fname in weights_first:
        os.replace(os.path.join(tmp, fname), os.path.join(path, fname))
    for fname in os.listdir(path):
        if fname not in new and any(fnmatch.fnmatch(fname, p) for p in MODEL_FILES):
            os.remove(os.path.join(path, fname))
    os.rmdir(tmp)
    fsync_dir(path)
