"""AdamW with linear warm-up then a constant or cosine schedule, optional global-norm clipping."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from fst_jax.config import require


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Paper defaults (D): AdamW(0.9, 0.999), weight decay 0, 10 warm-up steps, no clipping.

    Warm-up is linear, ``lr * (step + 1) / warmup_steps`` for the first ``warmup_steps`` applied
    steps (so the first step already moves the weights); then ``constant`` or ``cosine`` decay
    to ``lr * final_lr_ratio`` at ``total_steps``. ``clip_norm=0`` disables clipping.
    """

    lr: float = 1e-6
    warmup_steps: int = 10
    schedule: Literal["constant", "cosine"] = "constant"
    total_steps: int = 0
    final_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 0.0

    def __post_init__(self):
        require(self.lr > 0, "lr must be positive")
        require(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        require(self.schedule == "constant" or self.total_steps > self.warmup_steps,
                "a cosine schedule needs total_steps > warmup_steps")
        require(0 <= self.final_lr_ratio <= 1, "final_lr_ratio must be in [0, 1]")
        require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "betas must be in [0, 1)")
        require(self.weight_decay >= 0 and self.clip_norm >= 0,
                "weight_decay and clip_norm must be >= 0")


def learning_rate(cfg: OptimizerConfig) -> optax.Schedule:
    """The schedule ``applied_step (int) -> lr (float32)``."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1.0) / max(cfg.warmup_steps, 1))
        if cfg.schedule == "constant":
            return cfg.lr * warm
        frac = jnp.clip((step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps), 0.0, 1.0)
        cos = cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
        return cfg.lr * warm * cos

    return schedule


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Optional ``clip_by_global_norm`` then AdamW with ``learning_rate(cfg)``."""
    adamw = optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay)
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw


def apply_if(ok: jax.Array, opt: optax.GradientTransformation, grads, params, opt_state):
    """``(params, opt_state)`` after one ``opt`` update with ``grads`` where the traced bool
    ``ok`` holds, unchanged otherwise (a skipped non-finite step)."""
    def apply(operands):
        params, opt_state = operands
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.lax.cond(ok, apply, lambda x: x, (params, opt_state))
