"""LoRA adapters on the stacked decoder weights.

A target ``W [L, *in, *out]`` (e.g. ``wq [L, D, H, hd]``, ``wo [L, H, hd, D]``) gets adapters
``a [L, *in, r]`` (normal, std ``1/sqrt(fan_in)``) and ``b [L, r, *out]`` (zeros). Training
applies them on the activations, ``y = x W + (alpha / r) * (x a) b`` (``lora_adapters`` feeds the
model's layer scan), so the frozen ``W`` is a constant: no weight-sized delta and no gradient
for it. ``apply_lora`` merges them into the weights, ``W + (alpha / r) * a @ b``, for sampling
and export. Only the adapters are trained (and have optimizer state); the base weights stay
frozen and, with adapters off, are the reference model.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from fst_jax.config import require

IN_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
_LETTERS = "abcdefgh"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """``rank=0`` disables LoRA. ``targets``: names among ``IN_AXES`` (decoder layer weights)."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")

    def __post_init__(self):
        require(self.rank >= 0, "lora rank must be >= 0")
        require(self.alpha > 0, "lora alpha must be positive")
        require(len(self.targets) > 0, "lora targets must not be empty")
        for t in self.targets:
            require(t in IN_AXES, f"unknown lora target {t!r}; choose from {sorted(IN_AXES)}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def init_lora(weights: nnx.State, cfg: LoraConfig, seed: int = 0) -> nnx.State:
    """Adapters ``{target: {"a": Param [L, *in, r], "b": Param [L, r, *out]}}`` in float32, with
    ``logical_axes`` derived from the target's (``lora_rank`` for the new axis)."""
    key = jax.random.key(seed)
    out = {}
    for i, name in enumerate(cfg.targets):
        w = weights["layers"][name]
        k = IN_AXES[name]
        axes = w.get_metadata()["logical_axes"]
        in_shape, out_shape = w.shape[1:1 + k], w.shape[1 + k:]
        a_shape = (w.shape[0], *in_shape, cfg.rank)
        a = jax.random.normal(jax.random.fold_in(key, i), a_shape, jnp.float32)
        a = a / math.sqrt(math.prod(in_shape))
        b = jnp.zeros((w.shape[0], cfg.rank, *out_shape), jnp.float32)
        out[name] = {
            "a": nnx.Param(a, logical_axes=(axes[0], *axes[1:1 + k], "lora_rank")),
            "b": nnx.Param(b, logical_axes=(axes[0], "lora_rank", *axes[1 + k:])),
        }
    return nnx.State(out)


def lora_delta(name: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``a [L, *in, r] @ b [L, r, *out]`` -> ``[L, *in, *out]``."""
    k = IN_AXES[name]
    n_out = b.ndim - 2
    ins, outs = _LETTERS[:k], _LETTERS[k:k + n_out]
    return jnp.einsum(f"l{ins}r,lr{outs}->l{ins}{outs}", a, b)


def lora_adapters(lora: nnx.State, cfg: LoraConfig) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{target: (a [L, *in, r], scale * b [L, r, *out])}`` for the model's ``adapters``."""
    return {name: (ad["a"][...], cfg.scale * ad["b"][...]) for name, ad in lora.items()}


def apply_lora(weights: nnx.State, lora: nnx.State, cfg: LoraConfig) -> nnx.State:
    """A copy of the model ``weights`` with each target replaced by ``W + scale * a @ b``."""
    new = jax.tree.map(lambda x: x, weights)
    for name, ad in lora.items():
        w = new["layers"][name]
        delta = cfg.scale * lora_delta(name, ad["a"][...], ad["b"][...])
        new["layers"][name] = w.replace(w[...] + delta.astype(w.dtype))
    return new
