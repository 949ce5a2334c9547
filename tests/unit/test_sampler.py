# The one training sampler: disjoint replicas, a new permutation per epoch, resume equal to skipping, early errors.
import itertools

import numpy as np
import pytest

from pptk.data.sampler import Shard, micro_batches_per_epoch, train_indices
from pptk.errors import PptkError


def shard(rank=0, dp=1, mbs=4, accum=1):
    return Shard(dp_rank=rank, dp_size=dp, micro_batch_size=mbs, grad_accum_steps=accum)


def take(iterator, n):
    return [batch.tolist() for batch in itertools.islice(iterator, n)]


def test_replicas_see_disjoint_examples_covering_the_epoch():
    # 50 // (3 x 4) = 4 micro-batches per replica; 2 examples left over
    assert micro_batches_per_epoch(50, shard(dp=4, mbs=3)) == 4
    seen = [
        list(itertools.chain.from_iterable(take(train_indices(50, shard(rank, dp=4, mbs=3), seed=7), 4)))
        for rank in range(4)
    ]
    flat = [i for part in seen for i in part]
    assert all(len(part) == 12 for part in seen) and len(set(flat)) == 48 and set(flat) <= set(range(50))


def test_each_epoch_is_a_new_deterministic_permutation():
    def epochs(seed):
        ids = list(itertools.chain.from_iterable(take(train_indices(12, shard(), seed=seed), 9)))
        return ids[:12], ids[12:24], ids[24:]

    first, second, third = epochs(seed=1)
    assert sorted(first) == sorted(second) == sorted(third) == list(range(12))
    assert first != second != third
    assert epochs(seed=1) == (first, second, third) and epochs(seed=2)[0] != first


@pytest.mark.parametrize("start", [0, 1, 3, 5, 11])
def test_resume_equals_skipping(start):
    # 26 examples, 2 per micro-batch, 2 replicas: 6 micro-batches per epoch, so 11 crosses an epoch boundary
    for rank in range(2):
        full = take(train_indices(26, shard(rank, dp=2, mbs=2), seed=5), start + 8)[start:]
        assert take(train_indices(26, shard(rank, dp=2, mbs=2), seed=5, start=start), 8) == full


def test_whole_steps_per_epoch_skip_the_tail_that_does_not_fill_a_step():
    # 50 examples, 4 per micro-batch x 2 replicas = 6 micro-batches; 4 per step -> one whole step (4) per epoch
    assert micro_batches_per_epoch(50, shard(dp=2, accum=4)) == 6
    assert micro_batches_per_epoch(50, shard(dp=2, accum=4), whole_steps=True) == 4
    per_epoch = micro_batches_per_epoch(50, shard(dp=2, accum=3), whole_steps=True)
    assert per_epoch == 6
    first = take(train_indices(50, shard(0, dp=2, accum=3), seed=1, per_epoch=per_epoch), 12)
    epoch1, epoch2 = list(itertools.chain.from_iterable(first[:6])), list(itertools.chain.from_iterable(first[6:]))
    assert len(set(epoch1)) == len(set(epoch2)) == 24 and epoch1 != epoch2  # each epoch reshuffles all 50
    resumed = take(train_indices(50, shard(0, dp=2, accum=3), seed=1, per_epoch=per_epoch, start=7), 5)
    assert resumed == first[7:12]


def test_errors_are_raised_at_call_time():
    with pytest.raises(
        PptkError,
        match=r"10 training examples cannot give each of dp_size\(3\) replicas one "
        r"micro-batch of micro_batch_size 4: need at least 12",
    ):
        train_indices(10, shard(dp=3), seed=0)
    with pytest.raises(PptkError, match="need at least 16"):
        micro_batches_per_epoch(15, shard(dp=2, mbs=2, accum=4), whole_steps=True)
    with pytest.raises(PptkError, match=r"dp_rank\(2\) must be in \[0, dp_size\(2\)\)"):
        shard(rank=2, dp=2)
    with pytest.raises(PptkError, match="micro_batch_size must be a positive integer, got 0"):
        shard(mbs=0)
    with pytest.raises(PptkError, match=r"seed \(0\) and start \(-1\) must be >= 0"):
        train_indices(10, shard(), seed=0, start=-1)
    assert isinstance(next(train_indices(10, shard(), seed=0)), np.ndarray)
