"""Logits parity of our JAX decoder with transformers' PyTorch models (float32, tiny configs)."""

import jax.numpy as jnp
import numpy as np
import pytest

from fst_jax.models.configs import RopeScaling, tiny
from fst_jax.models.transformer import positions_from_mask, rope_inv_freq
from torch_reference import hf_logits, hf_model, jax_twin

TOL = 1e-4
LLAMA3_ROPE = RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64)
CONFIGS = {
    "llama": tiny("llama"),
    "qwen2_bias_untied": tiny("qwen2"),
    "qwen3_qk_norm": tiny("qwen3"),
    "llama3_rope_scaling": tiny("llama", rope_scaling=LLAMA3_ROPE),
}


def _tokens(cfg, batch, length, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length), dtype=np.int32)


def test_tiny_configs_exercise_each_family_feature():
    assert CONFIGS["qwen2_bias_untied"].attention_bias
    assert not CONFIGS["qwen2_bias_untied"].tie_word_embeddings
    assert CONFIGS["qwen3_qk_norm"].qk_norm
    assert CONFIGS["llama"].tie_word_embeddings


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    cfg = CONFIGS[name]
    ref_model = hf_model(cfg)
    model = jax_twin(cfg, ref_model)
    tokens = _tokens(cfg, 2, 48)
    mask = jnp.ones(tokens.shape, bool)
    ours = np.asarray(model(jnp.asarray(tokens), positions_from_mask(mask), mask))
    ref = hf_logits(ref_model, tokens)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ref).max() > 1.0  # non-trivial logits
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


def test_llama3_rope_frequencies_match_transformers():
    cfg = CONFIGS["llama3_rope_scaling"]
    ref_model = hf_model(cfg)
    assert ref_model.config.rope_parameters["rope_type"] == "llama3"
    ref = ref_model.model.rotary_emb.inv_freq.numpy()
    ours = np.asarray(rope_inv_freq(cfg))
    unscaled = np.asarray(rope_inv_freq(tiny("llama")))
    assert not np.allclose(ours, unscaled)  # the scaling changes low and medium frequencies
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


@pytest.mark.parametrize("name", ["llama", "qwen2_bias_untied", "qwen3_qk_norm"])
def test_left_padded_rows_match_transformers_on_unpadded_rows(name):
    cfg = CONFIGS[name]
    ref_model = hf_model(cfg)
    model = jax_twin(cfg, ref_model)
    T, pads = 24, [0, 5, 11]
    tokens = _tokens(cfg, len(pads), T, seed=1)
    mask = np.arange(T)[None, :] >= np.array(pads)[:, None]
    tokens = np.where(mask, tokens, 0)  # padding id never leaks into real positions
    positions = positions_from_mask(jnp.asarray(mask))
    ours = np.asarray(model(jnp.asarray(tokens), positions, jnp.asarray(mask)))
    for row, pad in enumerate(pads):
        ref = hf_logits(ref_model, tokens[row:row + 1, pad:])[0]
        np.testing.assert_allclose(ours[row, pad:], ref, rtol=0, atol=TOL)


def test_left_padding_matches_transformers_with_attention_mask_and_position_ids():
    cfg = CONFIGS["qwen2_bias_untied"]
    ref_model = hf_model(cfg)
    model = jax_twin(cfg, ref_model)
    T, pads = 16, [3, 0]
    tokens = _tokens(cfg, len(pads), T, seed=2)
    mask = np.arange(T)[None, :] >= np.array(pads)[:, None]
    positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)))
    ref = hf_logits(ref_model, tokens, mask=mask, positions=positions)
    np.testing.assert_allclose(ours[mask], ref[mask], rtol=0, atol=TOL)
