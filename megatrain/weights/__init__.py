"""Weight sources: a saved or pruned model, a Hugging Face directory, a layout-free or DeepSpeed checkpoint
(:func:`load_model_state`, one loading function), and ``model.init_from`` as a materialisation source."""
from megatrain.weights.sources import build_plain, init_source, load_model, load_model_state, save_model, tied_keys

__all__ = ["build_plain", "init_source", "load_model", "load_model_state", "save_model", "tied_keys"]
