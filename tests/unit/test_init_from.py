"""Weights from a saved model: parameters and BatchNorm statistics reach the model; size mismatches are named."""
import pytest
import torch

from megatrain.parallelize.materialize import StateSource
from megatrain.weights.sources import save_model
from megatrain.config import build_config
from megatrain.models.cnn import build_resnet
from megatrain.parallelize import parallelize
from megatrain.weights import init_source

CNN = {"model": {"arch": "resnet", "task": "classification", "widths": [4, 8], "blocks_per_stage": [1, 1]}}


def _trained_like(model):
    """Weights and running statistics that differ from a fresh build."""
    torch.manual_seed(3)
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.copy_(torch.rand_like(t) + 0.5)
    return model


def test_parallelize_copies_parameters_and_buffers():
    cfg = build_config(CNN)
    saved = _trained_like(build_resnet(cfg.model, seed=1)).state_dict()
    model = parallelize(build_resnet(cfg.model, seed=2), cfg, None, source=StateSource(saved, "test"))
    got = model.state_dict()
    assert set(got) == set(saved)
    for name, value in saved.items():  # BN running_mean/var and num_batches_tracked included
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


def test_init_source_checks_sizes(tmp_path):
    cfg = build_config(CNN)
    save_model(str(tmp_path / "m"), _trained_like(build_resnet(cfg.model, seed=1)), cfg.model)
    ok = build_config(CNN, {"model.init_from": str(tmp_path / "m")})
    assert init_source(ok.model).has("stem.0.weight")
    wider = build_config(CNN, {"model.init_from": str(tmp_path / "m"), "model.widths": [8, 8]})
    with pytest.raises(ValueError, match=r"model.widths=\[4, 8\] but the config has \[8, 8\]; pass --model.widths=\[4,8\]"):
        init_source(wider.model)
    with pytest.raises(ValueError, match=r"^model.init_from=\S*missing: no such directory"):
        init_source(build_config(CNN, {"model.init_from": str(tmp_path / "missing")}).model)
    with pytest.raises(ValueError, match="both set"):
        build_config(CNN, {"model.init_from": "a", "model.from_hf": "b"})
    with pytest.raises(ValueError, match="has shape"):
        StateSource({"w": torch.zeros(2)}, "x").tensor("w", (3,))
