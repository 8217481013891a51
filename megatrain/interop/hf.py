"""Hugging Face interop: local directories of any registry family (safetensors, sharded or not) in and out.

    model = megatrain.interop.hf.from_pretrained("/path/to/hf_dir")    # unsharded megatrain model, CPU
    logits = model(input_ids)                                          # (B, T, V)
    megatrain.interop.hf.save_pretrained(model, "/path/to/out")        # loads in transformers

Training reads HF weights through :class:`HFSource`, which hands over one logical tensor at a time so each
rank keeps only its shard (``--model.from_hf=DIR``). Import is strict: every config.json field that changes
the computation and every tensor of the checkpoint is used, or refused in one line naming it.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from megatrain.config.schema import Config, ModelConfig
from megatrain.errors import CheckpointError, ConfigError
from megatrain.interop.export import SHARD_BYTES, save_state_pretrained  # noqa: F401  (public API)
from megatrain.interop.hf_maps import _strip, check_unused, from_hf_map, model_fields_from_hf

# The fields config.json decides. A CLI override of one of them that disagrees is refused, not dropped.
ARCH_FIELDS = ("arch", "family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "ffn_hidden_size", "max_seq_len", "norm_eps", "rope_theta", "rope_scaling",
               "tie_embeddings", "activation", "qkv_bias", "qk_norm", "sliding_window")
_DTYPES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16", "half": "float16"}


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"model.from_hf={path}: no config.json; pass a local Hugging Face model directory")
    from megatrain.safe_io import read_json
    return read_json(cfg_path, what=f"model.from_hf={path}: config", fix="pass a local Hugging Face model directory",
                     error=CheckpointError)


def model_config_from_hf(path: str, base: ModelConfig | None = None, *, explicit: dict | None = None) -> ModelConfig:
    """ModelConfig with the architecture fields of an HF directory (other fields from ``base``).

    ``explicit``: model fields the user set on the command line; one that disagrees with config.json is a
    ConfigError (the architecture comes from the checkpoint, an override cannot change it)."""
    hf = read_hf_config(path)
    fields = model_fields_from_hf(hf, f"model.from_hf={path}")
    defaults = ModelConfig.model_fields
    arch = {k: fields.get(k, defaults[k].default) for k in ARCH_FIELDS}
    for key, value in (explicit or {}).items():
        if key in arch and value != arch[key]:
            raise ConfigError(f"--model.{key}={value} conflicts with {path}/config.json, which gives {arch[key]}; "
                              f"drop the override (the architecture comes from model.from_hf)")
    special = {k: hf[f"{k}_token_id"] for k in ("bos", "eos", "pad") if hf.get(f"{k}_token_id") is not None}
    dtype = _DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype") or "").removeprefix("torch."))
    data = (base.model_dump() if base is not None else {}) | arch | {"from_hf": path, "hf_special": special,
                                                                      "hf_dtype": dtype}
    return ModelConfig.model_validate(data)


def cli_model_fields(argv: list[str], model: ModelConfig) -> dict:
    """{field: validated value} of the ``--model.<field>`` overrides in ``argv``."""
    keys = {a[len("--model."):].split("=", 1)[0] for a in argv if a.startswith("--model.")}
    return {k: getattr(model, k) for k in keys if k in ModelConfig.model_fields}


def config_from_hf_args(cfg: Config, argv: list[str] | None = None) -> None:
    """With ``model.from_hf`` set, replace ``cfg.model``'s architecture by the directory's config.json, refusing a
    ``--model.*`` override in ``argv`` (None = ``sys.argv[1:]``) that disagrees with it. In place."""
    if not cfg.model.from_hf:
        return
    explicit = cli_model_fields(sys.argv[1:] if argv is None else argv, cfg.model)
    cfg.model = model_config_from_hf(cfg.model.from_hf, base=cfg.model, explicit=explicit)


def resolve_from_hf(cfg: Config, argv: list[str] | None = None) -> None:
    """``--model.from_hf=DIR`` as every training launcher (pretrain, finetune) takes it, before any data work:
    the architecture from DIR/config.json (:func:`config_from_hf_args`), every tensor of DIR accounted for
    (:class:`HFSource`), the export target checked, and ``data.tokenizer`` defaulting to DIR's tokenizer. In place;
    a bad directory, override or target is a one-line UserError. Nothing happens without ``model.from_hf``."""
    if not cfg.model.from_hf:
        return
    from megatrain.interop.export import check_export_target
    config_from_hf_args(cfg, argv)
    HFSource(cfg.model.from_hf, cfg.model)
    if cfg.checkpoint.export_hf:
        check_export_target(cfg.checkpoint.export_hf, overwrite=cfg.checkpoint.export_overwrite)
    if cfg.data.tokenizer is None:
        cfg.data.tokenizer = cfg.model.from_hf


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
        where = weight_map or {k: "model.safetensors" for k in self._files["model.safetensors"].keys()}
        # HF name as the map spells it → (file, name in the file)
        self._where = {_strip(k, model_cfg): (f, k) for k, f in where.items()}
        self._map = from_hf_map(model_cfg)
        used = {theirs for theirs, _ in self._map.values()}
        missing = sorted(used - set(self._where))
        if missing:
            raise CheckpointError(f"model.from_hf={path}: tensor {missing[0]!r} not found in the checkpoint "
                                  f"({len(missing)} missing); the directory's config.json does not match its weights")
        check_unused(set(self._where), used, model_cfg, f"model.from_hf={path}")

    def _hf(self, hf_name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        fname, name = self._where[hf_name]
        return self._files[fname].read(name, rows=rows).float()

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
    """A megatrain Transformer (unsharded, CPU) with the weights of a local HF directory."""
    from megatrain.models.build import build_model
    from megatrain.parallelize.materialize import materialize_
    from megatrain.parallelize.param_spec import tag_logical_names
    cfg = model_config_from_hf(path)
    source = HFSource(path, cfg)  # checks every tensor before anything is built
    model = build_model(cfg, meta=True)
    tag_logical_names(model)
    materialize_(model, source, tp_rank=0, tp_size=1, device="cpu", dtype=dtype)
    return model.eval()


def save_pretrained(model, path: str, *, max_shard_bytes: int = SHARD_BYTES, **kw) -> str:
    """Write ``model`` (a megatrain Transformer) as an HF directory; see :func:`save_state_pretrained`."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_state_pretrained(state, model.cfg, path, max_shard_bytes=max_shard_bytes, **kw)
