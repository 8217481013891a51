"""Tensor parallelism per Hugging Face family, on real gloo ranks: a tiny checkpoint written by transformers is
loaded into tp ranks (each reading its own slices, as training does); the gathered logits equal transformers'
(fp32, 1e-4), the vocab-parallel loss equals F.cross_entropy of transformers' logits, and every parameter's
gradient, gathered to its logical tensor, equals the unsharded megatrain model's.

Families: llama (GQA: 4 query heads on 2 kv heads), qwen2 (q/k/v bias, tied), mistral (sliding window 8 over 24
tokens), qwen3 (one kv head: replicated over tp), gpt2 (learned positions, biases, tied), and a llama with 3 kv
heads (12 query heads) — tp=2 and tp=4 neither divide nor are multiples of 3, so its k/v projections stay whole on
every rank — at tp=2 and tp=4, with sequence parallelism too.
"""
import pytest
import torch
import torch.nn.functional as F

from megatrain.testing import spawn_group
from tests.unit.test_hf_families import tiny

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.dist, pytest.mark.slow]
SEQ = 24  # divisible by tp=2 and 4 (sequence parallelism); > mistral's window of 8


def _write(family: str, path) -> None:
    if family == "gpt2":
        torch.manual_seed(0)
        ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4,
                                                                   n_positions=64)).eval()
    elif family == "llama-kv3":
        ref = tiny("llama", hidden_size=96, num_attention_heads=12, num_key_value_heads=3)
    else:
        ref = tiny(family)
    ref.save_pretrained(path)


def _check(rank, world, hf_dir, sp, dims, name):
    from megatrain.config import build_config
    from megatrain.distributed import host_collectives as hc
    from megatrain.interop.hf import HFSource, from_pretrained, model_config_from_hf
    from megatrain.models.build import build_model
    from megatrain.ops.cross_entropy import vocab_parallel_cross_entropy
    from megatrain.parallelize import parallelize
    from megatrain.parallelize.param_spec import spec_of
    from megatrain.parallelize.shards import gather_logical

    cfg = build_config({"parallel": {"tp": world, "sequence_parallel": sp}, "data": {"seq_len": SEQ},
                        "train": {"global_batch_size": 2, "micro_batch_size": 2, "precision": "fp32"}})
    cfg.model = model_config_from_hf(hf_dir, base=cfg.model.model_copy(update={"dropout": 0.0}))
    vocab = cfg.model.vocab_size
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, SEQ), generator=g)
    labels = torch.randint(0, vocab, (2, SEQ), generator=g)

    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        ref_logits = ref(ids).logits  # (B, T, V)
    plain = from_pretrained(hf_dir)  # unsharded megatrain: the gradient reference
    F.cross_entropy(plain(ids).flatten(0, 1), labels.flatten()).backward()
    ref_grads = {spec_of(p).logical_name if spec_of(p) else n: p.grad for n, p in plain.named_parameters()}

    model = parallelize(build_model(cfg.model, meta=True), cfg, dims, source=HFSource(hf_dir, cfg.model))
    model.eval()  # no dropout; tp needs no train mode
    local = model(ids)  # (B, T, V_padded / tp)
    logits = torch.cat(hc.all_gather(local.detach(), group=dims.tp_group), dim=-1)[..., :vocab]
    diff = (logits - ref_logits).abs().max().item()
    assert diff <= 1e-4, f"{name}: tp={world} logits differ from transformers by {diff:.3g}"
    loss = vocab_parallel_cross_entropy(local.flatten(0, 1), labels.flatten(), dims.tp_group, vocab_size=vocab)
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten())
    assert abs(loss.item() - ref_loss.item()) <= 1e-5, (name, loss.item(), ref_loss.item())
    loss.backward()
    seen = set()
    for p in model.parameters():
        spec = spec_of(p)
        if spec.logical_name in seen:
            continue
        seen.add(spec.logical_name)
        grad = gather_logical(p.grad, p, dims.tp_group, world)
        torch.testing.assert_close(grad, ref_grads[spec.logical_name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name} tp={world} sp={sp} grad of {spec.logical_name}: {m}")
    assert seen == set(ref_grads), (name, sorted(set(ref_grads) - seen))


def _worker(rank, world, cases):
    # one process group runs every case (spawning is the expensive part on 2 cores)
    from megatrain.distributed.dims import build_parallel_dims
    dims = build_parallel_dims(tp=world, pp=1, dp=1)
    for name, hf_dir, sp in cases:
        _check(rank, world, hf_dir, sp, dims, name)


@pytest.mark.parametrize("world, cases", [
    (2, [("llama", False), ("qwen2", False), ("mistral", False), ("qwen3", False), ("gpt2", False),
         ("llama-kv3", False), ("llama-kv3", True)]),
    (4, [("llama-kv3", False), ("llama-kv3", True)]),
], ids=["tp2", "tp4"])
def test_tp_matches_transformers_per_family(tmp_path, world, cases):
    for family in {f for f, _ in cases}:
        _write(family, tmp_path / family)
    spawn_group(world, _worker, [(f, str(tmp_path / f), sp) for f, sp in cases])

