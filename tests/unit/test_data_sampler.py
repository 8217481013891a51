"""GlobalBatchSampler: determinism, epochs without repeats, resume position; rank_slice partitions."""
import pytest

from megatrain.data.sampler import GlobalBatchSampler, rank_slice


def _steps(sampler, start, stop):
    return [sampler.indices_for_step(s) for s in range(start, stop)]


def test_deterministic_and_seed_dependent():
    a = _steps(GlobalBatchSampler(50, 8, seed=3), 0, 20)
    assert a == _steps(GlobalBatchSampler(50, 8, seed=3), 0, 20)
    assert a != _steps(GlobalBatchSampler(50, 8, seed=4), 0, 20)
    assert all(len(b) == 8 for b in a)


@pytest.mark.parametrize("num_samples,batch", [(48, 8), (50, 8), (5, 8)])
def test_every_epoch_is_a_permutation(num_samples, batch):
    sampler = GlobalBatchSampler(num_samples, batch, seed=0)
    flat = [i for b in _steps(sampler, 0, 3 * num_samples // batch + 2) for i in b]
    for e in range(3):  # wraps across epoch boundaries, inside a batch when needed
        assert sorted(flat[e * num_samples:(e + 1) * num_samples]) == list(range(num_samples))
    assert flat[:num_samples] != flat[num_samples:2 * num_samples]  # reshuffled per epoch


def test_resume_continues_the_uninterrupted_sequence():
    full = _steps(GlobalBatchSampler(37, 6, seed=11), 0, 20)
    first = GlobalBatchSampler(37, 6, seed=11)
    before = _steps(first, 0, 9)
    state = first.state_dict()
    assert state["consumed_samples"] == 9 * 6 and state["epoch"] == 54 // 37 and state["seed"] == 11
    restarted = GlobalBatchSampler(37, 6, seed=11)
    restarted.load_state_dict(state)
    assert restarted.next_step == 9
    after = _steps(restarted, restarted.next_step, 20)
    assert before + after == full


def test_resume_with_other_seed_or_dataset_is_refused():
    state = GlobalBatchSampler(37, 6, seed=11).state_dict()
    with pytest.raises(ValueError, match="seed"):
        GlobalBatchSampler(37, 6, seed=12).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples"):
        GlobalBatchSampler(40, 6, seed=11).load_state_dict(state)


def test_rank_slices_partition_the_global_batch():
    batch = GlobalBatchSampler(100, 24, seed=1).indices_for_step(2)
    dp, micro = 3, 2
    pieces = [rank_slice(batch, dp_rank=r, dp_size=dp, micro_batch_size=micro, micro_step=m)
              for m in range(24 // (dp * micro)) for r in range(dp)]
    assert [i for p in pieces for i in p] == batch  # the documented block layout, exactly once each
    assert rank_slice(batch, dp_rank=1, dp_size=dp, micro_batch_size=micro, micro_step=2) == batch[14:16]


def test_rank_slice_errors():
    with pytest.raises(ValueError, match="global_batch_size"):
        rank_slice(list(range(10)), dp_rank=0, dp_size=3, micro_batch_size=2, micro_step=0)
    with pytest.raises(ValueError, match="micro_step"):
        rank_slice(list(range(12)), dp_rank=0, dp_size=3, micro_batch_size=2, micro_step=2)
    with pytest.raises(ValueError, match="dp_rank"):
        rank_slice(list(range(12)), dp_rank=3, dp_size=3, micro_batch_size=2, micro_step=0)
    with pytest.raises(ValueError, match="empty"):
        GlobalBatchSampler(0, 4, seed=0)
