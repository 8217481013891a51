"""The planner's meta count of packed rows (positions and segments reach every block) equals what autograd keeps."""
import pytest
import torch

from megatrain.config.schema import ModelConfig
from megatrain.plan.activations import activation_bytes
from tests.unit.test_plan import TINY, _saved_by_autograd


def _saved_by_autograd_packed(m: ModelConfig, batch: int, seq: int) -> int:
    """Bytes autograd keeps for one packed forward + loss on CPU: two documents per row."""
    segments = (torch.arange(seq) >= seq // 3).long().expand(batch, seq)
    positions = torch.where(segments == 0, torch.arange(seq), torch.arange(seq) - seq // 3)
    return _saved_by_autograd(m, batch, seq, positions=positions, segments=segments)


@pytest.mark.parametrize("fields", TINY, ids=["gpt2", "llama", "llama-gqa"])
def test_packed_meta_count_equals_what_autograd_keeps(fields):
    m = ModelConfig(**fields)
    a = activation_bytes(m, micro_batch=2, seq_len=16, repeat_kv=True, packed=True)  # the reference attention
    plain = activation_bytes(m, micro_batch=2, seq_len=16, repeat_kv=True)
    assert a.per_block > plain.per_block  # the reference's document mask is kept for the backward
    predicted = a.embed + m.num_layers * a.per_block + a.head
    # the position and segment ids (B·T int64, shared by the blocks) at most
    assert abs(predicted - _saved_by_autograd_packed(m, 2, 16)) <= 1024


def test_packed_kernel_path_keeps_no_mask():
    m = ModelConfig(**TINY[2])
    kernel, packed = (activation_bytes(m, micro_batch=2, seq_len=16, packed=p).per_block for p in (False, True))
    # RoPE rows gathered per position (cos and sin: (B, 1, T, D) instead of (T, D)), never a (T, T) mask
    assert packed - kernel == 2 * (2 * 16 * 16 * 4 - 16 * 16 * 4)
