import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fst_jax.config import ConfigError
from fst_jax.rl.losses import (AGGREGATIONS, POLICY_LOSSES, LossConfig, aggregation_weights,
                               policy_loss, weighted_sum)

B, T = 6, 7
rng = np.random.default_rng(0)
LOGP = -rng.random((B, T)).astype(np.float32) * 3
OLD = (LOGP + rng.normal(0, 0.6, (B, T))).astype(np.float32)  # ratios spread around 1
ADV = rng.normal(0, 1, B).astype(np.float32)
MASK = rng.random((B, T)) < 0.7
MASK[4] = False  # a row without completion tokens (padding or dropped)
GROUPS = np.array([0, 1, 0, 2, 1, 2], np.int32)  # interleaved groups
BUDGET = np.array([10, 10, 12, 10, 10, 12], np.int32)  # generation budgets (max_new_tokens), >= T


def np_token_loss(cfg: LossConfig, logp, old, adv):
    rho, a = np.exp(logp - old), adv[:, None]
    if cfg.name == "cispo":
        return -np.clip(rho, cfg.tau_low, cfg.tau) * a * logp
    eps_high = cfg.epsilon_high or (0.28 if cfg.name == "dapo" else cfg.epsilon)
    return -np.minimum(rho * a, np.clip(rho, 1 - cfg.epsilon, 1 + eps_high) * a)


def np_aggregate(name, loss, mask, groups, budget):
    loss = np.where(mask, loss, 0.0)
    n = mask.sum(1)
    if name == "token":
        return loss.sum() / n.sum()
    if name == "sequence":
        rows = n > 0
        return np.mean(loss.sum(1)[rows] / n[rows])
    if name == "fixed":
        return loss.sum() / budget[n > 0].sum()
    per_group = [loss[groups == g].sum() / n[groups == g].sum()
                 for g in np.unique(groups) if n[groups == g].sum() > 0]
    return np.mean(per_group)


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_every_loss_and_aggregation_matches_numpy(name, agg):
    cfg = LossConfig(name=name, aggregation=agg, tau=1.3, tau_low=0.5)
    w, d = aggregation_weights(cfg, MASK, GROUPS, BUDGET)
    total, denom, _ = policy_loss(cfg, LOGP, OLD, ADV, MASK, w, d)
    expected = np_aggregate(agg, np_token_loss(cfg, LOGP, OLD, ADV), MASK, GROUPS, BUDGET)
    np.testing.assert_allclose(total / denom, expected, rtol=1e-5)


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
def test_row_subsets_add_up_to_the_full_batch_loss(agg):
    cfg = LossConfig(aggregation=agg)
    w, d = aggregation_weights(cfg, MASK, GROUPS, BUDGET)
    full, denom, _ = policy_loss(cfg, LOGP, OLD, ADV, MASK, w, d)
    parts = [policy_loss(cfg, LOGP[i::3], OLD[i::3], ADV[i::3], MASK[i::3], w[i::3], d[i::3])
             for i in range(3)]
    np.testing.assert_allclose(sum(p[0] for p in parts), full, rtol=1e-6)
    np.testing.assert_allclose(sum(p[1] for p in parts), denom, rtol=1e-6)


def test_group_aggregation_counts_each_group_once():
    _, d = aggregation_weights(LossConfig(aggregation="group"), MASK, GROUPS, BUDGET)
    assert float(d.sum()) == pytest.approx(3.0)


def test_losses_default_to_their_own_aggregation():
    assert LossConfig(name="cispo").aggregation_name == "group"
    assert LossConfig(name="dapo").aggregation_name == "token"
    assert LossConfig(name="dr_grpo").aggregation_name == "fixed"
    assert LossConfig(name="grpo", aggregation="token").aggregation_name == "token"


def _grad_wrt_logp(cfg):
    w, d = aggregation_weights(cfg, MASK, GROUPS, BUDGET)
    fn = lambda lp: policy_loss(cfg, lp, OLD, ADV, MASK, w, d)[0]
    return np.asarray(jax.grad(fn)(jnp.asarray(LOGP))), np.asarray(w)


def test_cispo_gradient_treats_the_clipped_weight_as_a_constant():
    cfg = LossConfig(name="cispo", aggregation="token", tau=1.3, tau_low=0.5)
    grad, w = _grad_wrt_logp(cfg)
    weight = np.clip(np.exp(LOGP - OLD), 0.5, 1.3)
    analytic = np.where(MASK, -weight * ADV[:, None] * w[:, None], 0.0)
    np.testing.assert_allclose(grad, analytic, rtol=1e-5, atol=1e-7)
    # clipped tokens keep a gradient (unlike PPO-clip)
    clipped = MASK & (np.exp(LOGP - OLD) > 1.3)
    assert clipped.any() and np.all(grad[clipped] != 0)


def test_ppo_clip_gradient_vanishes_exactly_where_clipping_is_active():
    cfg = LossConfig(name="grpo", aggregation="token", epsilon=0.2)
    grad, w = _grad_wrt_logp(cfg)
    rho, a = np.exp(LOGP - OLD), ADV[:, None]
    active = ((rho > 1.2) & (a > 0)) | ((rho < 0.8) & (a < 0))
    analytic = np.where(MASK & ~active, -rho * a * w[:, None], 0.0)
    np.testing.assert_allclose(grad, analytic, rtol=1e-5, atol=1e-7)
    assert (MASK & active).any()


def test_clip_flags_mark_clipped_tokens():
    cfg = LossConfig(name="dapo")
    _, _, flags = policy_loss(cfg, LOGP, OLD, ADV, MASK, *aggregation_weights(cfg, MASK, GROUPS, BUDGET))
    rho = np.exp(LOGP - OLD)
    np.testing.assert_array_equal(flags["clip_high"], (rho > 1.28) & (ADV[:, None] > 0))
    np.testing.assert_array_equal(flags["clip_low"], (rho < 0.8) & (ADV[:, None] < 0))


def test_masked_non_finite_values_do_not_leak_into_the_sum():
    values = np.where(MASK, 1.0, np.nan)
    assert float(weighted_sum(values, MASK, np.ones(B))) == MASK.sum()


def test_loss_config_validates_names_and_ranges():
    with pytest.raises(ConfigError, match="registered"):
        LossConfig(name="ppo2")
    with pytest.raises(ConfigError, match="registered"):
        LossConfig(aggregation="median")
    with pytest.raises(ConfigError):
        LossConfig(tau=1.0, tau_low=2.0)
