"""Acceptance rules, stop conditions and the epoch-shuffled minibatch sampler."""

import pytest

from fst_jax.fast.strategies import ACCEPTANCE, STOPPERS, EpochShuffledSampler, Progress, StopLimits, stop_reason


def test_strict_improvement_needs_a_higher_sum():
    assert ACCEPTANCE["strict_improvement"]([0, 1, 0], [1, 1, 0])
    assert not ACCEPTANCE["strict_improvement"]([0, 1, 0], [1, 0, 0])
    assert not ACCEPTANCE["strict_improvement"]([1, 0, 0], [0, 0, 0])


def test_improvement_or_equal_accepts_ties():
    assert ACCEPTANCE["improvement_or_equal"]([0, 1, 0], [1, 0, 0])
    assert not ACCEPTANCE["improvement_or_equal"]([0, 1, 0], [0, 0, 0])


@pytest.mark.parametrize("limits, progress, expect", [
    (StopLimits(max_metric_calls=10), Progress(10, 0, 0.0, 0), "metric calls"),
    (StopLimits(max_metric_calls=10), Progress(9, 0, 0.0, 0), None),
    (StopLimits(max_proposals=3), Progress(0, 3, 0.0, 0), "proposals"),
    (StopLimits(max_seconds=1.0), Progress(0, 0, 1.5, 0), "wall time"),
    (StopLimits(max_no_improvement=4), Progress(0, 0, 0.0, 4), "no improvement"),
    (StopLimits(), Progress(10**6, 10**6, 1e9, 10**6), None),
])
def test_stop_conditions(limits, progress, expect):
    reason = stop_reason(limits, progress)
    assert (reason is None) if expect is None else (expect in reason)
    assert set(STOPPERS) >= {"metric_calls", "proposals", "wall_time", "no_improvement"}


def test_each_epoch_visits_every_id_once_in_a_new_order():
    ids = [f"x{i}" for i in range(9)]
    sampler = EpochShuffledSampler(ids, batch_size=3, seed=5)
    epoch0 = [i for _ in range(3) for i in sampler.next_batch()]
    epoch1 = [i for _ in range(3) for i in sampler.next_batch()]
    assert sorted(epoch0) == sorted(epoch1) == sorted(ids)
    assert epoch0 != epoch1


def test_batches_spanning_epochs_have_no_repeats():
    sampler = EpochShuffledSampler(["a", "b", "c", "d"], batch_size=3, seed=0)
    for _ in range(20):
        batch = sampler.next_batch()
        assert len(batch) == 3 == len(set(batch))


def test_sampler_resumes_from_its_state():
    ids = [f"x{i}" for i in range(7)]
    a = EpochShuffledSampler(ids, 3, seed=1)
    for _ in range(4):
        a.next_batch()
    b = EpochShuffledSampler(ids, 3, seed=1, **a.state())
    assert [a.next_batch() for _ in range(5)] == [b.next_batch() for _ in range(5)]
