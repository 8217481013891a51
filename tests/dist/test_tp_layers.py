"""Tensor-parallel layers on 2 and 4 real ranks (gloo): forward outputs and every gradient equal the
unsharded computation (fp32, tight tolerance); vocab-parallel CE equals F.cross_entropy, including a
vocabulary tp does not divide (the padding must not change the loss)."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatrain.distributed.collectives import split_to_group
from megatrain.ops.cross_entropy import vocab_parallel_cross_entropy
from megatrain.distributed.tp_layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatrain.testing import spawn_group

pytestmark = pytest.mark.dist
TOL = dict(rtol=1e-5, atol=1e-6)


def _close(a, b, what):
    assert torch.allclose(a, b, **TOL), f"{what}: max diff {(a - b).abs().max().item():.3g}"


def _linears(rank, world, sequence_parallel):
    torch.manual_seed(0)
    g = dist.group.WORLD
    B, T, H, F_ = 2, 8, 12, 4 * world * 3
    x = torch.randn(B, T, H)
    up, down = torch.nn.Linear(H, F_), torch.nn.Linear(F_, H)
    grad_out = torch.randn(B, T, H)
    # reference: the unsharded MLP
    xr = x.clone().requires_grad_()
    ref = down(F.gelu(up(xr)))
    ref.backward(grad_out)
    col = ColumnParallelLinear.from_linear(up, group=g, sequence_parallel=sequence_parallel)
    row = RowParallelLinear.from_linear(down, group=g, sequence_parallel=sequence_parallel)
    xs = x.clone()
    if sequence_parallel:
        xs = xs.chunk(world, dim=1)[rank]
    xs.requires_grad_()
    out = row(F.gelu(col(xs)))
    go = grad_out.chunk(world, dim=1)[rank] if sequence_parallel else grad_out
    out.backward(go)
    _close(out, ref.chunk(world, dim=1)[rank] if sequence_parallel else ref, "output")
    _close(xs.grad, xr.grad.chunk(world, dim=1)[rank] if sequence_parallel else xr.grad, "input grad")
    _close(col.weight.grad, up.weight.grad.chunk(world, 0)[rank], "column weight grad")
    _close(col.bias.grad, up.bias.grad.chunk(world, 0)[rank], "column bias grad")
    _close(row.weight.grad, down.weight.grad.chunk(world, 1)[rank], "row weight grad")
    bias_grad = row.bias.grad.clone()
    if sequence_parallel:  # each rank saw a sequence shard: the full gradient is the sum
        dist.all_reduce(bias_grad)
    _close(bias_grad, down.bias.grad, "row bias grad")


def _embedding_and_ce(rank, world, vocab, smoothing):
    torch.manual_seed(1)
    g = dist.group.WORLD
    H, N = 8, 37
    padded = -(-vocab // world) * world
    table = torch.nn.Embedding(vocab, H)
    ids = torch.randint(0, vocab, (3, 5))
    ref = table(ids)
    ref.backward(torch.ones_like(ref))
    emb = VocabParallelEmbedding(table.weight, group=g, padded_vocab=padded)
    out = emb(ids)
    out.backward(torch.ones_like(out))
    _close(out, ref, "embedding output")
    full_grad = torch.cat([table.weight.grad, torch.zeros(padded - vocab, H)]).chunk(world, 0)[rank]
    _close(emb.weight.grad, full_grad, "embedding grad")

    logits = torch.randn(N, vocab) * 3
    labels = torch.randint(0, vocab, (N,))
    labels[::7] = -100
    lr = logits.clone().requires_grad_()
    ref_loss = F.cross_entropy(lr, labels, reduction="none", label_smoothing=smoothing)
    upstream = torch.rand(N)
    (ref_loss * upstream).sum().backward()
    padded_logits = torch.cat([logits, torch.full((N, padded - vocab), 123.0)], dim=1)  # garbage in padding
    shard = padded_logits.chunk(world, 1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, labels, g, reduction="none", vocab_size=vocab, label_smoothing=smoothing)
    (loss * upstream).sum().backward()
    _close(loss, ref_loss, "vocab-parallel CE")
    ref_grad = torch.cat([lr.grad, torch.zeros(N, padded - vocab)], dim=1).chunk(world, 1)[rank]
    _close(shard.grad, ref_grad, "vocab-parallel CE grad")


def _split_gather(rank, world):
    x = torch.arange(2 * 4 * world, dtype=torch.float32).reshape(2, 4 * world).requires_grad_()
    part = split_to_group(x, dist.group.WORLD, dim=-1)
    (part * (rank + 1)).sum().backward()
    expected = torch.cat([torch.full((2, 4), float(r + 1)) for r in range(world)], dim=1)
    _close(x.grad, expected, "split backward gathers")


def _all_layers(rank, world, vocab_cases):
    # One process group per world size runs every check (spawning is the expensive part on 2 cores).
    for sp in (False, True):
        _linears(rank, world, sp)
    for vocab, smoothing in vocab_cases:
        _embedding_and_ce(rank, world, vocab, smoothing)
    _split_gather(rank, world)


@pytest.mark.parametrize("world, vocab_cases", [(2, [(50, 0.0), (51, 0.1)]), (4, [(97, 0.0), (64, 0.1)])])
def test_tp_layers_equal_unsharded(world, vocab_cases):
    """Column/row linears (tp and tp+sp), vocab-parallel embedding and CE (vocab tp does not divide)."""
    spawn_group(world, _all_layers, vocab_cases)
