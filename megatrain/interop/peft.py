"""LoRA adapters written in the PEFT format: a directory ``peft.PeftModel.from_pretrained(hf_base, dir)`` loads.

``adapter_config.json`` (peft_type LORA, r, lora_alpha, lora_dropout, target_modules, ...) and
``adapter_model.safetensors`` with PEFT's tensor names, ``base_model.model.<HF module>.lora_A.weight`` (r, in) and
``...lora_B.weight`` (out, r). HF module names come from the registry's weight map (the module of the HF tensor
a base weight maps to). PEFT scales every adapter by lora_alpha / r, as megatrain does.

GPT-2 fuses q|k|v in one Conv1D (``attn.c_attn``). Three rank-r adapters on q, k and v are exactly one rank-3r
adapter on c_attn: A = [A_q; A_k; A_v] (3r, in) and B block-diagonal (3·H, 3r), written with rank_pattern 3r
and alpha_pattern 3·alpha so its scale stays alpha / r (an untargeted part is a zero block).
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from megatrain.config.schema import ModelConfig
from megatrain.errors import CheckpointError
from megatrain.fsutil import fsync_dir
from megatrain.interop.hf_maps import from_hf_map

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_QKV = ("q_proj", "k_proj", "v_proj")


def peft_adapter(state: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """(PEFT-named adapter tensors, adapter_config dict) from a full megatrain state dict with adapters."""
    lora, hf_map = cfg.lora, from_hf_map(cfg)
    prefixes = sorted(k[: -len(".lora_A")] for k in state if k.endswith(".lora_A"))
    if not prefixes:
        raise CheckpointError("the model has no LoRA adapters to export (model.lora.rank=0); train with "
                              "model.lora.rank>0, or export the whole model with checkpoint.export_hf")
    tensors, targets, fused = {}, set(), {}

    def put(module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.float().contiguous()  # (r, in)
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.float().contiguous()  # (out, r)
        targets.add(".".join(module.split(".")[-2:]))  # e.g. self_attn.q_proj: PEFT matches it as a suffix

    for prefix in prefixes:
        module = hf_map[prefix + ".weight"][0].removesuffix(".weight")
        a, b = state[prefix + ".lora_A"], state[prefix + ".lora_B"]
        if module.endswith(".c_attn"):  # GPT-2's fused q|k|v
            fused.setdefault(module, {})[_QKV.index(prefix.rsplit(".", 1)[-1])] = (a, b)
        else:
            put(module, a, b)
    r, h = lora.rank, cfg.hidden_size
    for module, parts in fused.items():
        a_cat = torch.zeros(3 * r, h)  # (3r, in)
        b_cat = torch.zeros(3 * h, 3 * r)  # (3H, 3r), block j = B of q, k or v
        for j, (a, b) in parts.items():
            a_cat[j * r:(j + 1) * r] = a
            b_cat[j * h:(j + 1) * h, j * r:(j + 1) * r] = b
        put(module, a_cat, b_cat)
    pattern = {"rank_pattern": {"attn.c_attn": 3 * r}, "alpha_pattern": {"attn.c_attn": 3 * lora.alpha}} \
        if fused else {"rank_pattern": {}, "alpha_pattern": {}}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": lora.alpha,
              "lora_dropout": lora.dropout, "target_modules": sorted(targets), "bias": "none",
              "fan_in_fan_out": cfg.arch == "gpt2",  # GPT-2's Conv1D stores (in, out)
              "base_model_name_or_path": cfg.from_hf, "inference_mode": True, "init_lora_weights": True,
              "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
              **pattern}
    return tensors, config


def save_peft_adapter(state: dict[str, torch.Tensor], cfg: ModelConfig, path: str, *, overwrite: bool = False) -> str:
    """Write the adapters of ``state`` as a PEFT adapter directory at ``path``: written and fsynced in a temp
    directory beside it, then renamed (an existing adapter directory is replaced only with ``overwrite``)."""
    from safetensors.torch import save_file
    from megatrain.interop.export import check_export_target
    path = os.path.abspath(path)
    check_export_target(path, overwrite=overwrite, field="checkpoint.export_peft")
    tensors, config = peft_adapter(state, cfg)
    tmp = f"{path}.tmp-peft-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    for fname in os.listdir(tmp):
        with open(os.path.join(tmp, fname), "rb+") as f:
            os.fsync(f.fileno())
    fsync_dir(tmp)
    if os.path.isdir(path):
        old = f"{path}.old-peft-{os.getpid()}"
        os.replace(path, old)  # two renames; the old adapter is dropped only once the new one is in place
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))
    return path
