import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fst_jax.config import ConfigError
from fst_jax.rl.kl import KL_ESTIMATORS, KLConfig

rng = np.random.default_rng(1)
LOGP = -rng.random(20).astype(np.float32) * 4
REF = -rng.random(20).astype(np.float32) * 4


@pytest.mark.parametrize("name,value,grad", [
    ("k1", lambda lp, rf: lp - rf, lambda lp, rf: np.ones_like(lp)),
    ("k2", lambda lp, rf: 0.5 * (lp - rf) ** 2, lambda lp, rf: lp - rf),
    ("k3", lambda lp, rf: np.exp(rf - lp) - 1 - (rf - lp), lambda lp, rf: 1 - np.exp(rf - lp)),
])
def test_kl_estimator_values_and_gradients_match_formulas(name, value, grad):
    fn = KL_ESTIMATORS[name]
    np.testing.assert_allclose(fn(LOGP, REF), value(LOGP, REF), rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda lp: fn(lp, REF).sum())(jnp.asarray(LOGP))
    np.testing.assert_allclose(g, grad(LOGP, REF), rtol=1e-5, atol=1e-6)


def _expected_autodiff_gradient(name, theta, ref_logp):
    """E_{y ~ pi_theta}[grad_theta k(log pi_theta(y), log ref(y))], exactly over a categorical."""
    probs = jax.nn.softmax(theta)
    per_sample = jax.jacobian(lambda t: KL_ESTIMATORS[name](jax.nn.log_softmax(t), ref_logp))(theta)
    return probs @ per_sample


def test_kl_gradients_in_expectation_follow_tang_and_munos():
    theta = jnp.asarray(rng.normal(0, 1, 6), jnp.float32)
    ref_logp = jax.nn.log_softmax(jnp.asarray(rng.normal(0, 1, 6), jnp.float32))
    reverse = jax.grad(lambda t: jnp.sum(jax.nn.softmax(t) * (jax.nn.log_softmax(t) - ref_logp)))(theta)
    forward = jax.grad(lambda t: jnp.sum(jnp.exp(ref_logp) * (ref_logp - jax.nn.log_softmax(t))))(theta)
    np.testing.assert_allclose(_expected_autodiff_gradient("k1", theta, ref_logp), 0, atol=1e-6)
    np.testing.assert_allclose(_expected_autodiff_gradient("k2", theta, ref_logp), reverse, atol=1e-6)
    np.testing.assert_allclose(_expected_autodiff_gradient("k3", theta, ref_logp), forward, atol=1e-6)
    assert not np.allclose(forward, reverse, atol=1e-3)


def test_k1_and_k3_values_are_unbiased_kl_estimates():
    theta = jnp.asarray(rng.normal(0, 1, 6), jnp.float32)
    logp, ref_logp = jax.nn.log_softmax(theta), jax.nn.log_softmax(jnp.arange(6.0) / 3)
    kl = jnp.sum(jnp.exp(logp) * (logp - ref_logp))
    for name in ("k1", "k3"):
        est = jnp.sum(jnp.exp(logp) * KL_ESTIMATORS[name](logp, ref_logp))
        np.testing.assert_allclose(est, kl, rtol=1e-5)


def test_kl_config_validates():
    with pytest.raises(ConfigError, match="registered"):
        KLConfig(estimator="k4")
    with pytest.raises(ConfigError):
        KLConfig(beta=-1.0)
