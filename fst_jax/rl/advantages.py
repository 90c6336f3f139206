"""Advantage estimators, registered by name, computed per problem group with segment ops.

Every estimator maps ``rewards [B] float32``, ``group_ids [B] int32`` (values in ``[0, B)``; a
group's rows need not be contiguous) and ``valid [B] bool`` (False for padding rows, which are
ignored) to ``advantages [B] float32`` (0 on invalid rows). ``compute_advantages`` sets the
advantages of a group whose rewards all agree to exactly 0 (a float mean such as 7 x 0.7 is
inexact, so ``r - mean`` need not be) and adds the options: batch-level std scaling and dropping
those groups.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp

from fst_jax.registry import register
from fst_jax.config import require, require_in_registry

AdvantageFn = Callable[[jax.Array, jax.Array, jax.Array, float], jax.Array]
ADVANTAGES: dict[str, AdvantageFn] = {}


# Decorator adding an estimator ``fn(rewards, group_ids, valid, eps) -> [B]``.
register_advantage = functools.partial(register, ADVANTAGES)


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    """``name``: a key of ``ADVANTAGES``. ``drop_zero_variance``: groups whose rewards are all
    equal get weight 0 (their rows are removed from the loss). ``batch_std_scale``: divide the
    advantages by the std of the rewards over the whole batch (TRL's ``scale_rewards="batch"``).
    ``eps`` guards divisions by a std. ``group_by``: the rows that share a baseline, all of a
    problem's rollouts whatever context each used ("problem", FST) or a problem's rollouts
    under one context ("problem_context", a per-context baseline); applied by
    ``fst_jax.rollout``, which assigns the group ids."""

    name: str = "grpo"
    group_by: Literal["problem", "problem_context"] = "problem"
    drop_zero_variance: bool = True
    batch_std_scale: bool = False
    eps: float = 1e-6

    def __post_init__(self):
        require_in_registry(self.name, ADVANTAGES, "advantage estimator")
        require(self.eps > 0, "advantage eps must be positive")
        require(not (self.batch_std_scale and self.name == "grpo"),
                "batch_std_scale with grpo would divide by a std twice; use dr_grpo or rloo")


def group_stats(rewards, group_ids, valid):
    """Per-row group count, mean and (population) std of the valid rows' rewards, each ``[B]``."""
    B = rewards.shape[0]
    w = valid.astype(jnp.float32)
    r = jnp.where(valid, rewards, 0.0).astype(jnp.float32)
    count = jax.ops.segment_sum(w, group_ids, num_segments=B)
    total = jax.ops.segment_sum(r, group_ids, num_segments=B)
    mean = total / jnp.maximum(count, 1.0)
    sq = jax.ops.segment_sum(w * (r - mean[group_ids]) ** 2, group_ids, num_segments=B)
    std = jnp.sqrt(sq / jnp.maximum(count, 1.0))
    return count[group_ids], mean[group_ids], std[group_ids]


@register_advantage("grpo")
def grpo(rewards, group_ids, valid, eps):
    """``(r - mean_group) / (std_group + eps)`` (population std, as the paper's formula)."""
    _, mean, std = group_stats(rewards, group_ids, valid)
    return jnp.where(valid, (rewards - mean) / (std + eps), 0.0)


@register_advantage("dr_grpo")
def dr_grpo(rewards, group_ids, valid, eps):
    """``r - mean_group`` (Dr. GRPO: no std normalisation)."""
    _, mean, _ = group_stats(rewards, group_ids, valid)
    return jnp.where(valid, rewards - mean, 0.0)


@register_advantage("rloo")
def rloo(rewards, group_ids, valid, eps):
    """Leave-one-out baseline ``r_i - mean_{j != i} r_j = n / (n - 1) * (r_i - mean_group)``;
    0 for groups of one."""
    count, mean, _ = group_stats(rewards, group_ids, valid)
    scale = jnp.where(count > 1, count / jnp.maximum(count - 1.0, 1.0), 0.0)
    return jnp.where(valid, scale * (rewards - mean), 0.0)


def compute_advantages(cfg: AdvantageConfig, rewards, group_ids, valid):
    """Advantages ``[B] float32`` and ``keep [B] bool`` (valid rows of groups not dropped)."""
    rewards = jnp.asarray(rewards, jnp.float32)
    group_ids = jnp.asarray(group_ids, jnp.int32)
    valid = jnp.asarray(valid, bool)
    adv = ADVANTAGES[cfg.name](rewards, group_ids, valid, cfg.eps)
    if cfg.batch_std_scale:
        n = jnp.maximum(valid.sum(), 1)
        mean = jnp.where(valid, rewards, 0.0).sum() / n
        std = jnp.sqrt(jnp.where(valid, (rewards - mean) ** 2, 0.0).sum() / n)
        adv = adv / (std + cfg.eps)
    B = rewards.shape[0]  # exact test of equal rewards: the group's max reward equals its min
    hi = jax.ops.segment_max(jnp.where(valid, rewards, -jnp.inf), group_ids, num_segments=B)
    lo = jax.ops.segment_min(jnp.where(valid, rewards, jnp.inf), group_ids, num_segments=B)
    varies = hi[group_ids] > lo[group_ids]
    keep = valid & varies if cfg.drop_zero_variance else valid
    return jnp.where(keep & varies, adv, 0.0), keep
