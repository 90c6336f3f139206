import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fst_jax.config import ConfigError
from fst_jax.models import configs
from fst_jax.models.transformer import init_model, positions_from_mask
from fst_jax.rl.lora import LoraConfig, apply_lora, init_lora, lora_adapters, lora_delta
from fst_jax.rl.train_step import (LearnerConfig, make_ref_logprobs, make_train_step,
                                   token_logprobs)
from rl_helpers import CFG, MODEL, host_batch, new_state, on_policy, one_device_mesh, to_host

LORA_CFG = dataclasses.replace(CFG, lora=LoraConfig(rank=4, alpha=8.0))


def _trained_lora(weights, cfg):
    """Adapters with non-zero ``b`` (as after some training)."""
    lora = init_lora(weights, cfg)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(lora))))
    return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), lora)


def _tokens(vocab, rows=2, length=9):
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, vocab, (rows, length)), jnp.int32)
    mask = jnp.ones_like(tokens, bool).at[0, :3].set(False)  # row 0 left-padded
    return tokens, positions_from_mask(mask), mask


def test_adapters_have_head_axes_and_start_as_a_no_op():
    weights = nnx.state(init_model(MODEL))
    lora = init_lora(weights, LoraConfig(rank=4))
    assert lora["wq"]["a"].shape == (2, 64, 4) and lora["wq"]["b"].shape == (2, 4, 4, 24)
    assert lora["wo"]["a"].shape == (2, 4, 24, 4) and lora["wo"]["b"].shape == (2, 4, 64)
    assert lora["wq"]["b"].get_metadata()["logical_axes"] == ("layers", "lora_rank", "heads", "head_dim")
    merged = apply_lora(weights, lora, LoraConfig(rank=4))
    jax.tree.map(np.testing.assert_array_equal, merged, weights)


def test_lora_delta_is_the_low_rank_product():
    a = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5, 4)), jnp.float32)
    b = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 7)), jnp.float32)
    expected = np.einsum("lhkr,lrd->lhkd", a, b)
    np.testing.assert_allclose(lora_delta("wo", a, b), expected, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_activation_lora_logits_equal_merged_weight_logits(family):
    model_cfg = configs.tiny(family)
    graphdef, weights = nnx.split(init_model(model_cfg))
    cfg = LoraConfig(rank=4, alpha=8.0)
    lora = _trained_lora(weights, cfg)
    tokens, positions, mask = _tokens(model_cfg.vocab_size)
    on_activations = nnx.merge(graphdef, weights)(tokens, positions, mask,
                                                  lora_adapters(lora, cfg))
    merged = nnx.merge(graphdef, apply_lora(weights, lora, cfg))(tokens, positions, mask)
    assert np.abs(np.asarray(merged) - np.asarray(nnx.merge(graphdef, weights)(
        tokens, positions, mask))).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(on_activations, merged, atol=1e-5, rtol=1e-5)


def _logp_sum_fns(graphdef, cfg, tokens, positions, mask):
    def on_activations(lora, weights):
        model = nnx.merge(graphdef, weights)
        return token_logprobs(model, tokens, positions, mask,
                              adapters=lora_adapters(lora, cfg))[0].sum()

    def merged(lora, weights):
        model = nnx.merge(graphdef, apply_lora(weights, lora, cfg))
        return token_logprobs(model, tokens, positions, mask)[0].sum()

    return on_activations, merged


def test_activation_lora_adapter_gradients_equal_merged_weight_gradients():
    graphdef, weights = nnx.split(init_model(MODEL))
    cfg = LoraConfig(rank=4, alpha=8.0)
    lora = _trained_lora(weights, cfg)
    on_activations, merged = _logp_sum_fns(graphdef, cfg, *_tokens(MODEL.vocab_size))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5),
                 jax.grad(on_activations)(lora, weights), jax.grad(merged)(lora, weights))


def test_adapter_gradients_cost_no_base_weight_gradient_matmuls():
    graphdef, weights = nnx.split(init_model(MODEL))
    cfg = LoraConfig(rank=4, alpha=8.0)
    lora = _trained_lora(weights, cfg)
    loss, _ = _logp_sum_fns(graphdef, cfg, *_tokens(MODEL.vocab_size))
    flops = lambda fn, *args: jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]
    forward = flops(loss, lora, weights)
    # Weight gradients would add a third forward-sized pass of matmuls.
    assert flops(jax.grad(loss), lora, weights) < 2.5 * forward
    assert flops(jax.grad(loss, argnums=1), lora, weights) > 2.5 * forward


def test_lora_trains_only_adapters_and_the_reference_stays_the_base():
    mesh = one_device_mesh()
    g, state = new_state(LORA_CFG, mesh)
    assert len(jax.tree.leaves(state.params)) == 0 and len(jax.tree.leaves(state.ref)) == 0
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(state.lora))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sorted(x.shape for x in moments) == sorted(adapter_shapes * 2)  # mu and nu only
    frozen0 = to_host(state.frozen)
    step = make_train_step(g, state, LORA_CFG, mesh)
    ref_fn = make_ref_logprobs(g, state, LORA_CFG, mesh)
    batch = on_policy(host_batch(), ref_fn, state, mesh)
    base = token_logprobs(init_model(MODEL), batch.tokens, batch.positions, batch.mask)[0]
    np.testing.assert_allclose(ref_fn(state, batch), base, atol=1e-5)
    for _ in range(3):
        state, metrics = step(state, batch)
    jax.tree.map(np.testing.assert_array_equal, to_host(state.frozen), frozen0)
    assert all(np.abs(np.asarray(ad["b"][...])).max() > 0 for ad in state.lora.values())
    np.testing.assert_allclose(ref_fn(state, batch), base, atol=1e-5)
    assert float(metrics["kl"]) > 0 and float(metrics["applied"]) == 1


def test_trainable_regex_selects_weights_by_path():
    cfg = dataclasses.replace(CFG, trainable=r"^(final_norm|layers/w_down)$")
    _, state = new_state(cfg, one_device_mesh())
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state.params)}
    assert paths == {"final_norm", "layers/w_down"}


def test_lora_with_kl_rejects_training_base_weights():
    with pytest.raises(ConfigError, match="reference"):
        LearnerConfig(lora=LoraConfig(rank=4), trainable="final_norm")
    with pytest.raises(ConfigError, match="lora target"):
        LoraConfig(rank=4, targets=("embed",))
