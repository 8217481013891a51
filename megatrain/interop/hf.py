"""Hugging Face interop: local GPT-2 / Llama directories (safetensors, sharded or not) in and out.

    model = megatrain.interop.hf.from_pretrained("/path/to/hf_dir")    # unsharded megatrain model, CPU
    logits = model(input_ids)                                          # (B, T, V)
    megatrain.interop.hf.save_pretrained(model, "/path/to/out")        # loads in transformers

Training reads HF weights through :class:`HFSource`, which hands over one logical tensor at a time so each
rank keeps only its shard (``--model.from_hf=DIR``).
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from megatrain.config.schema import ModelConfig
from megatrain.interop.hf_maps import from_hf_map, hf_config_from_model, model_fields_from_hf, to_hf_state
from megatrain.errors import CheckpointError

SHARD_BYTES = 2 * 1024**3  # split exported weights into files of at most this size, like transformers


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"model.from_hf={path}: no config.json; pass a local Hugging Face model directory")
    from megatrain.safe_io import read_json
    return read_json(cfg_path, what=f"model.from_hf={path}: config", fix="pass a local Hugging Face model directory",
                     error=CheckpointError)


def model_config_from_hf(path: str, base: ModelConfig | None = None) -> ModelConfig:
    """ModelConfig with the architecture fields of an HF directory (other fields from ``base``)."""
    fields = model_fields_from_hf(read_hf_config(path))
    data = (base.model_dump() if base is not None else {}) | fields | {"from_hf": path}
    return ModelConfig.model_validate(data)


class HFSource:
    """Full megatrain tensors computed from the HF tensors of a local directory, one at a time."""

    def __init__(self, path: str, model_cfg: ModelConfig):
        from megatrain.checkpoint.reader import SafetensorsReader
        self.path, self.cfg = path, model_cfg
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            weight_map = None
        else:
            raise CheckpointError(f"model.from_hf={path}: no model.safetensors or model.safetensors.index.json "
                             "(only safetensors weights are read; re-save with safe_serialization=True)")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._files = {}
        for fname in files:
            fpath = os.path.join(path, fname)
            if not os.path.isfile(fpath):
                raise CheckpointError(f"model.from_hf={path}: shard {fname} listed in the index is missing")
            self._files[fname] = SafetensorsReader(fpath)
        self._where = weight_map or {k: "model.safetensors" for k in self._files["model.safetensors"].keys()}
        self._map = from_hf_map(model_cfg)

    def _hf(self, hf_name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        for candidate in (hf_name, hf_name.removeprefix("transformer."), hf_name.removeprefix("model.")):
            if candidate in self._where:  # GPT2Model/LlamaModel checkpoints lack the LM wrapper's prefix
                return self._files[self._where[candidate]].read(candidate, rows=rows).float()
        raise CheckpointError(f"model.from_hf={self.path}: tensor {hf_name!r} not found in the checkpoint")

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        """Rows of tensors HF stores as-is (Llama's, GPT-2's embeddings); None when a transform is needed."""
        hf_name, fn = self._map[name]
        if getattr(fn, "identity", False):
            return self._hf(hf_name, rows=(start, stop))
        return None

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if name not in self._map:
            raise CheckpointError(f"model.from_hf={self.path}: no Hugging Face tensor maps to {name!r}")
        hf_name, fn = self._map[name]
        t = fn(self._hf(hf_name)).float()
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"model.from_hf={self.path}: {hf_name} gives shape {tuple(t.shape)} for {name}, "
                             f"expected {tuple(shape)}; the directory's config.json does not match its weights")
        return t


def from_pretrained(path: str, *, dtype: torch.dtype = torch.float32):
    """A megatrain Transformer (unsharded, CPU) with the weights of a local HF GPT-2/Llama directory."""
    from megatrain.checkpoint.materialize import materialize_
    from megatrain.checkpoint.shards import tag_logical_names
    from megatrain.models.transformer import build_transformer
    cfg = model_config_from_hf(path)
    model = build_transformer(cfg, meta=True)
    tag_logical_names(model)
    materialize_(model, HFSource(path, cfg), tp_rank=0, tp_size=1, device="cpu", dtype=dtype)
    return model.eval()


def save_pretrained(model, path: str, *, max_shard_bytes: int = SHARD_BYTES) -> str:
    """Write ``model`` (a megatrain Transformer) as an HF directory: config.json + safetensors, sharded
    with an index above ``max_shard_bytes``. Written to a temp dir and renamed (never half a directory)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_state_pretrained(state, model.cfg, path, max_shard_bytes=max_shard_bytes)


def save_state_pretrained(state: dict[str, torch.Tensor], cfg: ModelConfig, path: str, *,
                          max_shard_bytes: int = SHARD_BYTES) -> str:
    from safetensors.torch import save_file
    if cfg.tied and "head.lm_head.weight" not in state:
        state = {**state, "head.lm_head.weight": state["embed.wte.weight"]}
    hf_state = to_hf_state(state, cfg)
    if cfg.tied:
        hf_state.pop("lm_head.weight", None)  # transformers re-ties it from the embedding
    hf_config = hf_config_from_model(cfg) | {"torch_dtype": "float32"}
    path = os.path.abspath(path)
    tmp = path + ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards, current, size = [], {}, 0
    for name, t in hf_state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.contiguous()
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            total += sum(t.numel() * t.element_size() for t in shard.values())
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=1)
    for fname in os.listdir(tmp):
        with open(os.path.join(tmp, fname), "rb+") as f:
            os.fsync(f.fileno())
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
