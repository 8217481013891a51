"""Layout-free checkpoints: full logical tensors in safetensors + a JSON manifest, resumable under any
(tp, pp, dp, ZeRO) layout. See store.py for the format and layout_free.py for save/resume."""
from megatrain.checkpoint.store import CheckpointError, resolve_resume

__all__ = ["CheckpointError", "load_model_state", "resolve_resume"]


def load_model_state(path: str):
    from megatrain.checkpoint.layout_free import load_model_state as _load
    return _load(path)

