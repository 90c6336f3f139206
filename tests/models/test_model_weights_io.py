"""HF folder round trips with transformers, and clear errors for bad folders and configs."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from fst_jax.config import ConfigError
from fst_jax.models.configs import ModelConfig, tiny
from fst_jax.models.transformer import init_model, positions_from_mask
from fst_jax.models.weights import (WeightsError, hf_to_params, load_hf_folder, model_params,
                                    params_to_hf, save_hf_folder)
from torch_reference import hf_logits, hf_model, state_dict_numpy

TOL = 1e-4
FAMILIES = ["llama", "qwen2", "qwen3"]


def _tokens(cfg, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 16), dtype=np.int32)


def _logits(model, tokens):
    mask = jnp.ones(tokens.shape, bool)
    return np.asarray(model(jnp.asarray(tokens), positions_from_mask(mask), mask))


def _load_transformers(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_params_to_hf_inverts_hf_to_params(family):
    cfg = tiny(family)
    sd = state_dict_numpy(hf_model(cfg))
    back = params_to_hf(cfg, hf_to_params(cfg, sd))
    expected = {k for k in sd if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    assert set(back) == expected
    for k in expected:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_folder_loads_in_transformers_with_same_logits(family, tmp_path):
    cfg = tiny(family)
    model = init_model(cfg, seed=3)
    save_hf_folder(model, tmp_path)
    ref_model = _load_transformers(tmp_path)
    assert type(ref_model).__name__ == json.loads((tmp_path / "config.json").read_text())[
        "architectures"][0]
    tokens = _tokens(cfg)
    np.testing.assert_allclose(_logits(model, tokens), hf_logits(ref_model, tokens), rtol=0, atol=TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_load_hf_folder_round_trips_config_and_params(family, tmp_path):
    cfg = tiny(family)
    model = init_model(cfg, seed=4)
    save_hf_folder(model, tmp_path)
    cfg2, model2 = load_hf_folder(tmp_path)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, model_params(model), model_params(model2))


@pytest.mark.parametrize("family", FAMILIES)
def test_load_hf_folder_of_transformers_save_pretrained_gives_same_logits(family, tmp_path):
    cfg = tiny(family)
    ref_model = hf_model(cfg)
    ref_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    cfg2, model = load_hf_folder(tmp_path)
    assert cfg2 == cfg
    tokens = _tokens(cfg, seed=1)
    np.testing.assert_allclose(_logits(model, tokens), hf_logits(ref_model, tokens), rtol=0, atol=TOL)


def test_load_hf_folder_reads_sharded_checkpoint_with_index(tmp_path):
    cfg = tiny("qwen2")
    ref_model = hf_model(cfg)
    ref_model.save_pretrained(tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    _, model = load_hf_folder(tmp_path)
    tokens = _tokens(cfg, seed=2)
    np.testing.assert_allclose(_logits(model, tokens), hf_logits(ref_model, tokens), rtol=0, atol=TOL)


def test_load_hf_folder_upcasts_bfloat16_checkpoint(tmp_path):
    cfg = tiny("llama")
    ref_model = hf_model(cfg).to(torch.bfloat16)
    ref_model.save_pretrained(tmp_path)
    cfg2, model = load_hf_folder(tmp_path)
    assert cfg2.param_dtype == "float32"
    tokens = _tokens(cfg, seed=3)
    ref = hf_logits(_load_transformers(tmp_path), tokens)  # upcast on load, like ours
    np.testing.assert_allclose(_logits(model, tokens), ref, rtol=0, atol=TOL)


# -- errors ----------------------------------------------------------------------------------
@pytest.fixture
def saved_qwen3(tmp_path):
    """A folder written by transformers for tiny qwen3, and its tensors."""
    cfg = tiny("qwen3")
    model = hf_model(cfg)
    model.save_pretrained(tmp_path)
    return tmp_path, state_dict_numpy(model)


def _rewrite_tensors(folder, tensors):
    from safetensors.numpy import save_file

    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_folder_without_config_json_raises(tmp_path):
    with pytest.raises(WeightsError, match="config.json not found"):
        load_hf_folder(tmp_path)


def test_folder_without_safetensors_raises(saved_qwen3):
    folder, _ = saved_qwen3
    os.remove(folder / "model.safetensors")
    with pytest.raises(WeightsError, match="no model.safetensors"):
        load_hf_folder(folder)


def test_corrupt_safetensors_raises(saved_qwen3):
    folder, _ = saved_qwen3
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot read"):
        load_hf_folder(folder)


def test_missing_tensor_is_named(saved_qwen3):
    folder, tensors = saved_qwen3
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    _rewrite_tensors(folder, tensors)
    with pytest.raises(WeightsError, match=r"'model\.layers\.1\.self_attn\.k_norm\.weight' missing"):
        load_hf_folder(folder)


@pytest.mark.parametrize("name, transform", [
    ("model.layers.1.self_attn.q_proj.weight", lambda w: w.T),  # same size, transposed
    ("model.layers.0.mlp.down_proj.weight", lambda w: w[:, :-1]),
    ("model.layers.0.self_attn.q_norm.weight", lambda w: w[:-1]),
    ("model.embed_tokens.weight", lambda w: w[:-1]),
    ("lm_head.weight", lambda w: w[:, :-1]),
])
def test_wrong_tensor_shape_is_named(saved_qwen3, name, transform):
    folder, tensors = saved_qwen3
    tensors[name] = np.ascontiguousarray(transform(tensors[name]))
    _rewrite_tensors(folder, tensors)
    with pytest.raises(WeightsError, match=re.escape(f"'{name}' has shape {tensors[name].shape}")):
        load_hf_folder(folder)


def test_unsupported_model_type_raises(saved_qwen3):
    folder, _ = saved_qwen3
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2'"):
        load_hf_folder(folder)


@pytest.mark.parametrize("family, key, value", [
    ("llama", "attention_bias", True),  # Llama's attention bias includes o_proj
    ("qwen3", "attention_bias", True),
    ("llama", "mlp_bias", True),
    ("qwen2", "use_sliding_window", True),
    ("llama", "hidden_act", "gelu"),
])
def test_unsupported_architecture_option_raises(family, key, value):
    hf = {**tiny(family).to_hf(), key: value}
    with pytest.raises(ConfigError, match=f"{key}={value!r} is not supported"):
        ModelConfig.from_hf(hf)


def test_unsupported_rope_scaling_raises():
    hf = {**tiny("llama").to_hf(), "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ConfigError, match="unsupported rope scaling 'yarn'"):
        ModelConfig.from_hf(hf)
