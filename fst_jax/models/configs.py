"""Model configs: one decoder family (Llama, Qwen2/2.5, Qwen3) described by flags.

``ModelConfig.from_hf(dict)`` reads a transformers ``config.json`` dict; ``to_hf()`` writes one
that transformers loads. ``tiny(family)`` gives small random-init configs for tests.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from fst_jax.config import ConfigError, require

Family = Literal["llama", "qwen2", "qwen3"]
DType = Literal["float32", "bfloat16", "float16"]

_HF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x "llama3" rope scaling; ``rope_type="default"`` means none."""

    rope_type: Literal["default", "llama3"] = "default"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer hyper-parameters and numerics.

    ``head_dim`` is independent of ``hidden_size``. ``attention_bias`` adds q/k/v biases (Qwen2);
    ``qk_norm`` adds per-head RMSNorm on q and k before RoPE (Qwen3). ``dtype`` is the compute
    dtype, ``param_dtype`` the storage dtype; logits are always returned in float32.
    ``remat`` rematerialises each layer in the backward pass.
    """

    family: Family = "llama"
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 100000.0
    rope_scaling: RopeScaling = RopeScaling()
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 8192
    dtype: DType = "float32"
    param_dtype: DType = "float32"
    remat: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            require(getattr(self, name) > 0, f"{name} must be positive")
        require(self.num_heads % self.num_kv_heads == 0,
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        require(self.head_dim % 2 == 0, "head_dim must be even for RoPE")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
        """Config from a transformers config.json dict (llama, qwen2, qwen3 model types)."""
        model_type = hf.get("model_type")
        if model_type not in _HF_ARCH:
            raise ConfigError(f"unsupported model_type {model_type!r}; supported: {sorted(_HF_ARCH)}")
        unsupported = {
            "attention_bias": model_type != "qwen2" and hf.get("attention_bias"),  # adds o_proj bias
            "mlp_bias": hf.get("mlp_bias"),
            "use_sliding_window": hf.get("use_sliding_window"),
            "hidden_act": hf.get("hidden_act", "silu") != "silu",
        }
        for key, bad in unsupported.items():
            if bad:
                raise ConfigError(f"{model_type} config with {key}={hf[key]!r} is not supported")
        num_heads = hf["num_attention_heads"]
        rs = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        rope_type = rs.get("rope_type", rs.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ConfigError(f"unsupported rope scaling {rope_type!r}")
        scaling = RopeScaling() if rope_type == "default" else RopeScaling(
            rope_type="llama3", factor=float(rs["factor"]),
            low_freq_factor=float(rs["low_freq_factor"]),
            high_freq_factor=float(rs["high_freq_factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
        theta = hf.get("rope_theta", rs.get("rope_theta", 10000.0))
        kw = dict(
            family=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """A transformers config.json dict for this architecture."""
        hf: dict[str, Any] = {
            "architectures": [_HF_ARCH[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "torch_dtype": self.param_dtype,
        }
        if self.family == "llama":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        if self.rope_scaling.rope_type == "llama3":
            hf["rope_scaling"] = {"rope_type": "llama3", **{
                k: v for k, v in dataclasses.asdict(self.rope_scaling).items() if k != "rope_type"}}
        return hf


def tiny(family: Family = "llama", **overrides) -> ModelConfig:
    """A small random-init config of ``family`` for tests (2 layers, GQA, head_dim != hidden/heads)."""
    base = dict(family=family, vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=24, rope_theta=10000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=family == "llama", attention_bias=family == "qwen2",
                qk_norm=family == "qwen3", max_position_embeddings=512)
    base.update(overrides)
    return ModelConfig(**base)


SMOLLM2_135M = ModelConfig()

QWEN3_8B = ModelConfig(
    family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
    num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, attention_bias=False, qk_norm=True, max_position_embeddings=40960,
    dtype="bfloat16", param_dtype="float32", remat=True)
"""Qwen3-8B's architecture (the paper's model; HF ``Qwen/Qwen3-8B`` config.json) for pod
configs and dry runs: bfloat16 compute over float32 master weights, layers rematerialised."""
