"""The run's kernel policy reaches the model, the loss and the optimizer as an object; nothing process-wide."""
import torch

from megatrain.config import build_config
from megatrain.models.build import build_model
from megatrain.ops import dispatch
from megatrain.ops.kernels import DEFAULT_KERNELS, Kernels, use_kernels
from megatrain.parallelize import parallelize

TINY = {"model.arch": "llama", "model.vocab_size": 64, "model.hidden_size": 32, "model.num_layers": 2,
        "model.num_heads": 4, "model.max_seq_len": 16, "train.global_batch_size": 2, "train.micro_batch_size": 2}


def _kernels_of(model):
    return {type(m).__name__: m.kernels for m in model.modules() if isinstance(getattr(m, "kernels", None), Kernels)}


def test_parallelize_hands_the_model_its_policy_and_leaves_the_default_alone():
    before = dispatch.current_config()
    cfg = build_config(None, {**TINY, "model.kernel_overrides": {"attention": "torch"}})
    model = parallelize(build_model(cfg.model, meta=True), cfg, None)
    found = _kernels_of(model)
    assert set(found) == {"Norm", "Attention", "MLP"}
    policies = {id(k.policy) for k in found.values()}
    assert len(policies) == 1 and next(iter(found.values())).policy.wanted("attention") == "torch"
    assert dispatch.current_config() is before  # the process default was not replaced
    assert all(m.kernels is DEFAULT_KERNELS for m in build_model(cfg.model).modules() if hasattr(m, "kernels"))


def test_a_model_runs_the_kernels_it_was_given():
    cfg = build_config(None, TINY)
    model = build_model(cfg.model)
    calls = []

    class Recording(Kernels):
        def attention(self, q, k, v, causal=True, window=None):
            calls.append(tuple(q.shape))
            return super().attention(q, k, v, causal, window)

    ids = torch.randint(0, 64, (2, 8))
    ref = model(ids)
    assert use_kernels(model, Recording()) == 2 * 4 + 1  # per block: 2 norms, attention, MLP; one final norm
    assert len(calls) == 0
    out = model(ids)
    assert len(calls) == 2 and torch.equal(out, ref)
