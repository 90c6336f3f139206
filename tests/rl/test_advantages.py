import numpy as np
import pytest

from fst_jax.config import ConfigError
from fst_jax.rl.advantages import ADVANTAGES, AdvantageConfig, compute_advantages

# Three problems whose rows are interleaved, plus one padding row (group 3, invalid).
REWARDS = np.array([1.0, 0.0, 0.5, 0.0, 1.0, 0.5, 1.0, 0.0, 9.0], np.float32)
GROUPS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 3], np.int32)
VALID = np.arange(9) < 8


def numpy_advantages(name, rewards, groups, valid, eps=1e-6):
    out = np.zeros_like(rewards)
    for g in np.unique(groups[valid]):
        idx = np.where((groups == g) & valid)[0]
        r = rewards[idx]
        if name == "grpo":
            out[idx] = (r - r.mean()) / (r.std() + eps)
        elif name == "dr_grpo":
            out[idx] = r - r.mean()
        else:  # rloo
            out[idx] = [r[i] - np.delete(r, i).mean() for i in range(len(r))] if len(r) > 1 else 0
    return out


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_advantages_match_numpy_with_non_contiguous_groups(name):
    cfg = AdvantageConfig(name=name, drop_zero_variance=False)
    adv, keep = compute_advantages(cfg, REWARDS, GROUPS, VALID)
    np.testing.assert_allclose(adv, numpy_advantages(name, REWARDS, GROUPS, VALID), atol=1e-5)
    np.testing.assert_array_equal(keep, VALID)


def test_zero_variance_groups_are_dropped_and_padding_ignored():
    rewards = np.array([1, 1, 0, 1, 1, 1, 0, 0], np.float32)
    groups = np.array([0, 0, 1, 2, 1, 2, 3, 3], np.int32)
    valid = np.array([True] * 7 + [False])
    adv, keep = map(np.asarray, compute_advantages(AdvantageConfig(), rewards, groups, valid))
    # group 0 and 2 all ones (zero variance), group 3 has one valid row only -> dropped too
    np.testing.assert_array_equal(keep, [False, False, True, False, True, False, False, False])
    np.testing.assert_allclose(adv[[2, 4]], [-1.0, 1.0], atol=1e-5)
    assert np.all(adv[~keep] == 0)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_a_group_of_equal_rewards_has_exactly_zero_advantage_when_kept(name):
    """7 x 0.7 has an inexact float32 mean: the group's advantages must still be exactly 0."""
    rewards = np.array([0.7] * 7 + [0.0, 1.0], np.float32)
    groups = np.array([0] * 7 + [1, 1], np.int32)
    cfg = AdvantageConfig(name=name, drop_zero_variance=False)
    adv, keep = map(np.asarray, compute_advantages(cfg, rewards, groups, np.ones(9, bool)))
    assert np.abs(adv[:7]).max() == 0.0
    assert keep.all() and adv[7] < 0 < adv[8]


def test_batch_std_scaling_divides_by_batch_reward_std():
    cfg = AdvantageConfig(name="dr_grpo", drop_zero_variance=False, batch_std_scale=True)
    adv, _ = compute_advantages(cfg, REWARDS, GROUPS, VALID)
    ref = numpy_advantages("dr_grpo", REWARDS, GROUPS, VALID) / (REWARDS[VALID].std() + 1e-6)
    np.testing.assert_allclose(adv, ref, atol=1e-5)


def test_advantage_config_rejects_unknown_names():
    with pytest.raises(ConfigError, match="registered"):
        AdvantageConfig(name="nope")
