import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fst_jax.config import ConfigError
from fst_jax.models.transformer import init_model, positions_from_mask
from fst_jax.rl.batch import shard_batch
from fst_jax.rl.train_step import (LearnerConfig, make_ref_logprobs, make_train_step,
                                   token_logprobs)
from rl_helpers import CFG, MODEL, host_batch, new_state, one_device_mesh, to_host


def _inputs(rows=3, length=11):
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, MODEL.vocab_size, (rows, length)),
                         jnp.int32)
    mask = jnp.ones_like(tokens, bool).at[0, :4].set(False)  # row 0 left-padded
    return tokens, positions_from_mask(mask), mask


@pytest.mark.parametrize("chunk", [1, 3, 10, 64])
def test_chunked_logprobs_and_entropy_equal_unchunked(chunk):
    model = init_model(MODEL)
    inputs = _inputs()
    logp, ent = token_logprobs(model, *inputs, with_entropy=True)
    logp_c, ent_c = token_logprobs(model, *inputs, with_entropy=True, chunk=chunk)
    assert logp_c.shape == ent_c.shape == inputs[0].shape
    np.testing.assert_allclose(logp_c, logp, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ent_c, ent, atol=1e-5, rtol=1e-5)


def test_chunked_logprob_gradients_equal_unchunked():
    graphdef, weights = nnx.split(init_model(MODEL))
    inputs = _inputs()
    row_w = jnp.linspace(-1.0, 1.0, inputs[0].size).reshape(inputs[0].shape)

    def loss(weights, chunk):
        logp, _ = token_logprobs(nnx.merge(graphdef, weights), *inputs, chunk=chunk)
        return (row_w * logp).sum()

    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5),
                 jax.grad(loss)(weights, 4), jax.grad(loss)(weights, 0))


def _one_step(cfg):
    mesh = one_device_mesh()
    g, state = new_state(cfg, mesh)
    batch = shard_batch(host_batch(), mesh)
    ref = np.asarray(make_ref_logprobs(g, state, cfg, mesh)(state, batch))
    state, metrics = make_train_step(g, state, cfg, mesh)(state, batch)
    return ref, to_host(state.params), {k: float(v) for k, v in metrics.items()}


def test_train_step_with_logits_chunk_matches_unchunked():
    ref, params, metrics = _one_step(CFG)
    ref_c, params_c, metrics_c = _one_step(dataclasses.replace(CFG, logits_chunk=5))
    np.testing.assert_allclose(ref_c, ref, atol=1e-5)
    for key in ("loss", "loss_policy", "loss_kl", "grad_norm", "entropy", "logp_pearson"):
        np.testing.assert_allclose(metrics_c[key], metrics[key], rtol=1e-5, atol=1e-5, err_msg=key)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), params_c, params)


def test_negative_logits_chunk_is_rejected():
    with pytest.raises(ConfigError, match="logits_chunk"):
        LearnerConfig(logits_chunk=-1)
