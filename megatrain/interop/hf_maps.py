"""Weight and config maps between Hugging Face checkpoints and megatrain's Transformer.

The per-family definitions are the model specs of megatrain/models/registry.py; this module applies them.
Each megatrain tensor is a function of one HF tensor (``from_hf``), and each HF tensor a function of megatrain
tensors (``to_hf``), so a loader can read only the HF tensors a rank needs. GPT-2 stores projections as
Conv1D (in, out) — transposed against nn.Linear — and fuses q|k|v in c_attn.
"""
from __future__ import annotations

import torch

from megatrain.config.schema import ModelConfig
from megatrain.errors import CheckpointError
from megatrain.models.registry import WeightMap, fields_from_hf, spec_for

Tensor = torch.Tensor


def model_fields_from_hf(hf: dict, where: str = "model.from_hf") -> dict:
    """ModelConfig fields from an HF ``config.json`` dict (any family of the registry)."""
    return fields_from_hf(hf, where)


def hf_config_from_model(cfg: ModelConfig) -> dict:
    return spec_for(cfg).hf_config(cfg)


def from_hf_map(cfg: ModelConfig) -> WeightMap:
    """megatrain name → (HF name, function of that HF tensor giving the megatrain tensor)."""
    return spec_for(cfg).weight_map(cfg)


def to_hf_state(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Full megatrain state dict → HF state dict (contiguous tensors, ready for safetensors)."""
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[int, Tensor]] = {}
    names = ("q", "k", "v")
    gpt2 = cfg.arch == "gpt2"
    for ours, (theirs, _) in from_hf_map(cfg).items():
        t = state[ours]
        if gpt2 and ".c_attn." in theirs:
            j = names.index(ours.split(".")[-2][0])
            fused.setdefault(theirs, {})[j] = t.t() if t.dim() == 2 else t
            continue
        out[theirs] = t.t() if (gpt2 and t.dim() == 2 and ".h." in theirs) else t
    for theirs, parts in fused.items():
        out[theirs] = torch.cat([parts[j] for j in range(3)], dim=-1)
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = state["head.lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state(hf_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """HF state dict → megatrain state dict (full tensors); a tensor no parameter uses is refused."""
    hf_state = {_strip(k, cfg): v for k, v in hf_state.items()}
    out, used = {}, set()
    for ours, (theirs, fn) in from_hf_map(cfg).items():
        if theirs not in hf_state:
            raise CheckpointError(f"Hugging Face checkpoint lacks tensor {theirs!r} (needed for {ours})")
        out[ours] = fn(hf_state[theirs]).contiguous()
        used.add(theirs)
    check_unused(set(hf_state), used, cfg, "Hugging Face checkpoint")
    if cfg.tied:
        out["head.lm_head.weight"] = out["embed.wte.weight"]
    return out


def _strip(name: str, cfg: ModelConfig) -> str:
    """Base-model checkpoints (GPT2Model / LlamaModel) lack the LM wrapper's prefix."""
    prefix = "transformer." if cfg.arch == "gpt2" else "model."
    return name if name.startswith(prefix) or name == "lm_head.weight" else prefix + name


def check_unused(present: set[str], used: set[str], cfg: ModelConfig, where: str) -> None:
    """One line naming the tensors of the checkpoint that no megatrain parameter takes (a bias in a directory
    whose config says there is none would otherwise be dropped silently)."""
    from megatrain.models.registry import spec_for
    spec = spec_for(cfg)
    extra = sorted(n for n in present - used if not n.endswith(spec.extra_tensors)
                   and not (cfg.tied and n == "lm_head.weight"))  # transformers re-ties a saved tied head too
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise CheckpointError(f"{where}: tensor(s) {', '.join(extra[:3])}{more} are not used by a "
                              f"{cfg.hf_family} model with this config.json; the config and the weights disagree")
