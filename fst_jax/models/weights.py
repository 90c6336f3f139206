"""Weights in and out: HF folders (config.json + safetensors, sharded index too) and GGUF files.

HF tensors are ``[out, in]``; ours are stacked over layers with explicit head axes (see
``transformer.DecoderLayers``). ``hf_to_params`` / ``params_to_hf`` convert between the two as
NumPy arrays; ``load_hf_folder`` builds a ready ``Transformer``; ``save_hf_folder`` writes a
folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fst_jax import distributed
from fst_jax.models.configs import ModelConfig
from fst_jax.models.transformer import Transformer, init_model


class WeightsError(RuntimeError):
    """Missing, malformed or mismatched weight files."""


def _layer_map(cfg: ModelConfig) -> dict[str, str]:
    """Our stacked name -> HF per-layer name (``{i}`` is the layer index)."""
    m = {
        "attn_norm": "model.layers.{i}.input_layernorm.weight",
        "wq": "model.layers.{i}.self_attn.q_proj.weight",
        "wk": "model.layers.{i}.self_attn.k_proj.weight",
        "wv": "model.layers.{i}.self_attn.v_proj.weight",
        "wo": "model.layers.{i}.self_attn.o_proj.weight",
        "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
        "w_gate": "model.layers.{i}.mlp.gate_proj.weight",
        "w_up": "model.layers.{i}.mlp.up_proj.weight",
        "w_down": "model.layers.{i}.mlp.down_proj.weight",
    }
    if cfg.attention_bias:
        m.update(bq="model.layers.{i}.self_attn.q_proj.bias", bk="model.layers.{i}.self_attn.k_proj.bias",
                 bv="model.layers.{i}.self_attn.v_proj.bias")
    if cfg.qk_norm:
        m.update(q_norm="model.layers.{i}.self_attn.q_norm.weight",
                 k_norm="model.layers.{i}.self_attn.k_norm.weight")
    return m


def _hf_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The HF per-layer tensor shape of our stacked weight ``name``."""
    H, K, hd, D, F = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size,
                      cfg.intermediate_size)
    return {"attn_norm": (D,), "mlp_norm": (D,), "wq": (H * hd, D), "wk": (K * hd, D),
            "wv": (K * hd, D), "wo": (D, H * hd), "bq": (H * hd,), "bk": (K * hd,),
            "bv": (K * hd,), "q_norm": (hd,), "k_norm": (hd,), "w_gate": (F, D), "w_up": (F, D),
            "w_down": (D, F)}[name]


def _to_ours(name: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    H, K, hd, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    if name in ("wq", "wk", "wv"):  # [heads*hd, D] -> [D, heads, hd]
        return w.T.reshape(D, H if name == "wq" else K, hd)
    if name == "wo":  # [D, H*hd] -> [H, hd, D]
        return w.T.reshape(H, hd, D)
    if name in ("bq", "bk", "bv"):
        return w.reshape(H if name == "bq" else K, hd)
    if name in ("w_gate", "w_up", "w_down"):
        return w.T
    return w


def _to_hf(name: str, w: np.ndarray) -> np.ndarray:
    if name in ("wq", "wk", "wv"):
        return w.reshape(w.shape[0], -1).T
    if name == "wo":
        return w.reshape(-1, w.shape[-1]).T
    if name in ("bq", "bk", "bv"):
        return w.reshape(-1)
    if name in ("w_gate", "w_up", "w_down"):
        return w.T
    return w


def hf_to_params(cfg: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict:
    """HF-named tensors -> our nested param dict (NumPy, ``cfg.param_dtype``)."""
    dt = np.dtype(jnp.dtype(cfg.param_dtype))

    def get(name, shape):
        if name not in tensors:
            raise WeightsError(f"weight {name!r} missing from checkpoint")
        w = np.asarray(tensors[name], dtype=np.float32)
        if w.shape != shape:
            raise WeightsError(f"weight {name!r} has shape {w.shape}, config expects {shape}")
        return w

    layers = {}
    for ours, theirs in _layer_map(cfg).items():
        shape = _hf_shape(ours, cfg)
        stacked = np.stack([_to_ours(ours, get(theirs.format(i=i), shape), cfg)
                            for i in range(cfg.num_layers)])
        layers[ours] = stacked.astype(dt)
    V, D = cfg.vocab_size, cfg.hidden_size
    params = {"embed": get("model.embed_tokens.weight", (V, D)).astype(dt), "layers": layers,
              "final_norm": get("model.norm.weight", (D,)).astype(dt)}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = get("lm_head.weight", (V, D)).T.astype(dt)
    return params


def params_to_hf(cfg: ModelConfig, params: Mapping) -> dict[str, np.ndarray]:
    """Our nested param dict -> HF-named float32 tensors."""
    out = {"model.embed_tokens.weight": np.asarray(params["embed"], np.float32),
           "model.norm.weight": np.asarray(params["final_norm"], np.float32)}
    for ours, theirs in _layer_map(cfg).items():
        stacked = np.asarray(params["layers"][ours], np.float32)
        for i in range(cfg.num_layers):
            out[theirs.format(i=i)] = np.ascontiguousarray(_to_hf(ours, stacked[i]))
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"], np.float32).T)
    return out


def model_from_params(cfg: ModelConfig, params: Mapping) -> Transformer:
    """A ``Transformer`` holding ``params`` (a nested dict as from ``hf_to_params``)."""
    model = nnx.eval_shape(lambda: init_model(cfg))
    state = nnx.state(model, nnx.Param)
    flat_expected = dict(nnx.to_flat_state(state))
    for path, var in flat_expected.items():
        node = params
        for p in path:
            node = node[p]
        if tuple(node.shape) != tuple(var.shape):
            raise WeightsError(f"{'.'.join(map(str, path))}: shape {node.shape} != {var.shape}")
        var.set_value(jnp.asarray(node, dtype=var.dtype))
    nnx.update(model, state)
    return model


def model_params(model: Transformer) -> dict:
    """The model's parameters as a nested dict of arrays."""
    return nnx.state(model, nnx.Param).to_pure_dict()


def read_safetensors_folder(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of ``model.safetensors`` or of a sharded ``model.safetensors.index.json``."""
    from safetensors.numpy import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise WeightsError(f"no model.safetensors or model.safetensors.index.json in {folder}")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            tensors.update(load_file(str(folder / f)))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise WeightsError(f"cannot read {folder / f}: {e}") from e
    return tensors


def load_hf_folder(folder: str | Path, **cfg_overrides) -> tuple[ModelConfig, Transformer]:
    """Config and model from an HF folder; ``cfg_overrides`` set e.g. dtype or remat."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise WeightsError(f"{cfg_file} not found (is {folder} an HF model folder?)")
    cfg = ModelConfig.from_hf(json.loads(cfg_file.read_text()), **cfg_overrides)
    return cfg, model_from_params(cfg, hf_to_params(cfg, read_safetensors_folder(folder)))


def save_hf_folder(model: Transformer, folder: str | Path, tokenizer=None) -> Path:
    """Write config.json + model.safetensors (float32) that transformers can load, and with a
    ``tokenizer`` its files (``tokenizer.save(folder)``). Collective: every process must call it;
    parameters sharded over several processes' devices are gathered to process 0 leaf by leaf,
    and process 0 alone writes. Returns ``folder`` on every process."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    params = distributed.gather_to_primary(model_params(model))
    if not distributed.is_primary():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    save_file(params_to_hf(cfg, params), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


# -- GGUF ------------------------------------------------------------------------------------
_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-rotary permutation of q/k rows."""
    d_out, d_in = w.shape
    hd = d_out // n_head
    return w.reshape(n_head, hd // 2, 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def read_gguf(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """A llama-architecture GGUF file -> (HF config dict, HF-named float32 tensors)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise WeightsError(f"cannot read GGUF {path}: {e}") from e

    def field(name):
        f = reader.fields[name]
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types and f.types[0].name == "STRING" else v.tolist()[0]

    arch = field("general.architecture")
    if arch != "llama":
        raise WeightsError(f"GGUF architecture {arch!r} not supported (llama only)")
    n_head = field("llama.attention.head_count")
    n_kv = field("llama.attention.head_count_kv")
    hidden = field("llama.embedding_length")
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)]) if w.ndim == 1 and len(t.shape) > 1 else w
        name = t.name
        if name in _GGUF_NAMES:
            tensors[_GGUF_NAMES[name]] = w
            continue
        _, layer, kind, suffix = name.split(".")
        if kind == "attn_q":
            w = _unpermute_qk(w, n_head)
        elif kind == "attn_k":
            w = _unpermute_qk(w, n_kv)
        tensors[f"model.layers.{layer}.{_GGUF_BLOCK[kind]}.{suffix}"] = w
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    hf = {
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": field("llama.feed_forward_length"),
        "num_hidden_layers": field("llama.block_count"), "num_attention_heads": n_head,
        "num_key_value_heads": n_kv, "head_dim": hidden // n_head,
        "rope_theta": float(field("llama.rope.freq_base")),
        "rms_norm_eps": float(field("llama.attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "max_position_embeddings": field("llama.context_length"),
    }
    return hf, tensors
