import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fst_jax.config import ConfigError
from fst_jax.rl.batch import build_train_batch
from fst_jax.rl.losses import (AGGREGATIONS, POLICY_LOSSES, LossConfig, LossInput,
                               aggregation_weights, loss_input, policy_loss, register_loss,
                               weighted_sum)

B, T = 6, 7
rng = np.random.default_rng(0)
LOGP = -rng.random((B, T)).astype(np.float32) * 3
OLD = (LOGP + rng.normal(0, 0.6, (B, T))).astype(np.float32)  # ratios spread around 1
ADV = rng.normal(0, 1, B).astype(np.float32)
MASK = rng.random((B, T)) < 0.7
MASK[4] = False  # a row without completion tokens (padding or dropped)
ENT = (rng.random((B, T)) * 2).astype(np.float32)  # the trainer's entropies
GROUPS = np.array([0, 1, 0, 2, 1, 2], np.int32)  # interleaved groups
BUDGET = np.array([10, 10, 12, 10, 10, 12], np.int32)  # generation budgets (max_new_tokens), >= T


def make_input(logp=LOGP, old=OLD, ent=ENT):
    return LossInput(logp=logp, sampler_logp=old, ref_logp=np.zeros_like(LOGP), advantages=ADV,
                     mask=MASK, group_ids=GROUPS, entropy=ent, temperature=np.ones(B, np.float32))


def np_token_loss(cfg: LossConfig, logp, old, adv, mask):
    rho, a = np.exp(logp - old), adv[:, None]
    if cfg.name == "cispo":
        return -np.clip(rho, cfg.tau_low, cfg.tau) * a * logp
    if cfg.name == "gspo":  # the row's sequence ratio on each of its tokens
        n = np.maximum(mask.sum(1, keepdims=True), 1)
        s = np.exp(np.where(mask, logp - old, 0).sum(1, keepdims=True) / n)
        rho = np.broadcast_to(s, rho.shape)
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
    total, denom, _ = policy_loss(cfg, make_input(), w, d)
    expected = np_aggregate(agg, np_token_loss(cfg, LOGP, OLD, ADV, MASK), MASK, GROUPS, BUDGET)
    np.testing.assert_allclose(total / denom, expected, rtol=1e-5)


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_row_subsets_add_up_to_the_full_batch_loss(name, agg):
    cfg = LossConfig(name=name, aggregation=agg)
    w, d = aggregation_weights(cfg, MASK, GROUPS, BUDGET)
    full, denom, _ = policy_loss(cfg, make_input(), w, d)
    rows = lambda i: jax.tree.map(lambda v: v[i::3], make_input())
    parts = [policy_loss(cfg, rows(i), w[i::3], d[i::3]) for i in range(3)]
    np.testing.assert_allclose(sum(p[0] for p in parts), full, rtol=1e-6)
    np.testing.assert_allclose(sum(p[1] for p in parts), denom, rtol=1e-6)


def test_group_aggregation_counts_each_group_once():
    _, d = aggregation_weights(LossConfig(aggregation="group"), MASK, GROUPS, BUDGET)
    assert float(d.sum()) == pytest.approx(3.0)


def test_losses_default_to_their_own_aggregation():
    assert LossConfig(name="cispo").aggregation_name == "group"
    assert LossConfig(name="dapo").aggregation_name == "token"
    assert LossConfig(name="dr_grpo").aggregation_name == "fixed"
    assert LossConfig(name="gspo").aggregation_name == "sequence"
    assert LossConfig(name="grpo", aggregation="token").aggregation_name == "token"


def _grad_wrt_logp(cfg, old=OLD):
    w, d = aggregation_weights(cfg, MASK, GROUPS, BUDGET)
    fn = lambda lp: policy_loss(cfg, make_input(lp, old), w, d)[0]
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
    _, _, flags = policy_loss(cfg, make_input(), *aggregation_weights(cfg, MASK, GROUPS, BUDGET))
    rho = np.exp(LOGP - OLD)
    np.testing.assert_array_equal(flags["clip_high"], (rho > 1.28) & (ADV[:, None] > 0))
    np.testing.assert_array_equal(flags["clip_low"], (rho < 0.8) & (ADV[:, None] < 0))


def np_gspo(logp, old, adv, mask, eps, eps_high):
    """GSPO by hand: over the rows with loss tokens, the mean of -min(s * A, clip(s) * A) with
    s = exp(mean over the row's tokens of (logp - old))."""
    objectives = []
    for lp, o, a, m in zip(logp, old, adv, mask):
        if m.any():
            s = np.exp(np.mean(lp[m] - o[m]))
            objectives.append(min(s * a, np.clip(s, 1 - eps, 1 + eps_high) * a))
    return -np.mean(objectives)


def test_gspo_value_gradient_and_flags_match_a_hand_computation():
    cfg = LossConfig(name="gspo", epsilon=0.2, epsilon_high=0.3)
    w, d = aggregation_weights(cfg, MASK, GROUPS, BUDGET)
    total, denom, flags = policy_loss(cfg, make_input(), w, d)
    lp64, old64 = LOGP.astype(np.float64), OLD.astype(np.float64)
    np.testing.assert_allclose(total / denom, np_gspo(lp64, old64, ADV, MASK, 0.2, 0.3), rtol=1e-5)

    grad = np.asarray(jax.grad(lambda lp: policy_loss(cfg, make_input(lp), w, d)[0] / d.sum())(
        jnp.asarray(LOGP)))
    h, numeric = 1e-6, np.zeros_like(lp64)
    for b, t in zip(*np.nonzero(MASK)):
        e = np.zeros_like(lp64)
        e[b, t] = h
        numeric[b, t] = (np_gspo(lp64 + e, old64, ADV, MASK, 0.2, 0.3)
                         - np_gspo(lp64 - e, old64, ADV, MASK, 0.2, 0.3)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-7)

    s = np.exp(np.where(MASK, LOGP - OLD, 0).sum(1) / np.maximum(MASK.sum(1), 1))
    high, low = (s > 1.3) & (ADV > 0), (s < 0.8) & (ADV < 0)
    np.testing.assert_array_equal(flags["clip_high"], np.broadcast_to(high[:, None], (B, T)))
    np.testing.assert_array_equal(flags["clip_low"], np.broadcast_to(low[:, None], (B, T)))
    # the data has clipped rows (no gradient) and unclipped ones
    clipped = high | low
    assert (clipped & MASK.any(1)).any() and (~clipped & MASK.any(1)).any()
    assert np.all(grad[clipped] == 0) and np.all(grad[~clipped][MASK[~clipped]] != 0)


def test_gspo_on_policy_gradient_is_the_sequence_mean_policy_gradient():
    """logp == sampler_logp: s = 1 in every row, and the loss sum's gradient (the loss times the
    row count) is -A / tokens(row) on each completion token, GRPO's on-policy gradient."""
    grad, _ = _grad_wrt_logp(LossConfig(name="gspo", epsilon=3e-4, epsilon_high=4e-4), old=LOGP)
    expected = np.where(MASK, -ADV[:, None] / np.maximum(MASK.sum(1), 1)[:, None], 0.0)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(grad, _grad_wrt_logp(LossConfig(name="grpo"), old=LOGP)[0],
                               rtol=1e-5, atol=1e-8)


@pytest.fixture
def entropy_shaped():
    """A loss added from this file alone: REINFORCE with the advantage shaped by the (detached)
    entropy, ``-(A + 0.1 * H) * logp``, token mean."""

    @register_loss("test_entropy_shaped", aggregation="token")
    def fn(inp: LossInput, cfg):
        return -(inp.advantages[:, None] + 0.1 * inp.entropy) * inp.logp, {}

    yield LossConfig(name="test_entropy_shaped")
    del POLICY_LOSSES["test_entropy_shaped"]


def test_a_loss_registered_in_another_file_reads_the_inputs_entropy(entropy_shaped):
    cfg = entropy_shaped
    w, d = aggregation_weights(cfg, MASK, GROUPS, BUDGET)
    total, denom, _ = policy_loss(cfg, make_input(), w, d)
    expected = np_aggregate("token", -(ADV[:, None] + 0.1 * ENT) * LOGP, MASK, GROUPS, BUDGET)
    np.testing.assert_allclose(total / denom, expected, rtol=1e-5)
    grad, _ = _grad_wrt_logp(cfg)
    np.testing.assert_allclose(grad, np.where(MASK, -(ADV[:, None] + 0.1 * ENT), 0.0), rtol=1e-5)


def test_loss_input_takes_the_batchs_loss_mask_and_detaches_the_entropy(entropy_shaped):
    """Group 1 has no reward variance, so its rows are completions outside the loss mask."""
    batch = build_train_batch([[1, 2], [3], [4, 5], [6]], [[7, 8, 9], [10, 11], [12], [13, 14]],
                              [[-1.0, -2.0, -0.5], [-0.1, -0.2], [-3.0], [-1.0, -1.5]],
                              [1.0, 0.0, 1.0, 1.0], ["a", "a", "b", "b"], [0, 1, 0, 1], pad_id=0,
                              temperature=[0.5, 1.0, 0.7, 0.7])
    assert (batch.completion_mask != batch.loss_mask).any()
    shape = batch.tokens.shape
    logp, ent = -jnp.ones(shape), jnp.full(shape, 2.0)
    inp = loss_input(batch, logp, ent)
    expected = dict(logp=logp, sampler_logp=batch.sampler_logp, ref_logp=batch.ref_logp,
                    advantages=batch.advantages, mask=batch.loss_mask, group_ids=batch.group_ids,
                    entropy=ent, temperature=batch.temperature)
    assert set(expected) == set(LossInput._fields)
    for field, value in expected.items():
        np.testing.assert_array_equal(getattr(inp, field), value, err_msg=field)
    w, d = aggregation_weights(entropy_shaped, batch.loss_mask, batch.group_ids,
                               batch.completion_budget)
    loss = lambda e: policy_loss(entropy_shaped, loss_input(batch, logp, e), w, d)[0]
    assert float(loss(ent)) != float(loss(2 * ent))
    np.testing.assert_array_equal(jax.grad(loss)(ent), 0.0)


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
