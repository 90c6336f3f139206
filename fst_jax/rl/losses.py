"""Policy-gradient losses and token aggregations, registered by name.

Alignment (see ``rl.batch``): every ``[B, T]`` array at index ``t`` refers to token ``t``,
predicted from tokens ``< t``; ``mask [B, T] bool`` marks completion tokens (the only ones in
the loss). ``logp`` is the trainer's log-prob (differentiable), ``old_logp`` the sampler's.

A policy loss ``fn(logp, old_logp, adv [B], cfg) -> (token_loss [B, T], flags)`` gives a
per-token loss and ``flags``, named ``[B, T]`` bool arrays (e.g. where clipping was active).
An aggregation ``fn(mask, group_ids, budget) -> (row_weight [B], row_denom [B])`` turns
token losses into ``sum_b row_weight_b * sum_t loss_bt`` over ``sum_b row_denom_b``. Weights are
computed once on the whole batch, so numerator and denominator are plain sums over rows and any
split into micro-batches adds up to the full-batch loss exactly. ``budget [B]`` is each row's
generation budget (``TrainBatch.completion_budget``: the sampler's ``max_new_tokens``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fst_jax.registry import register
from fst_jax.config import require, require_in_registry

sg = jax.lax.stop_gradient


class PolicyLoss(NamedTuple):
    fn: Callable
    aggregation: str  # the loss's own aggregation, used when the config names none


POLICY_LOSSES: dict[str, PolicyLoss] = {}
AGGREGATIONS: dict[str, Callable] = {}


def register_loss(name: str, aggregation: str):
    """Decorator: register ``fn(logp, old_logp, adv, cfg) -> (token_loss, flags)``."""

    def deco(fn):
        POLICY_LOSSES[name] = PolicyLoss(fn, aggregation)
        return fn

    return deco


# Decorator adding ``fn(mask, group_ids, budget) -> (row_weight, row_denom)``.
register_aggregation = functools.partial(register, AGGREGATIONS)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """``name``: a key of ``POLICY_LOSSES``. ``aggregation``: a key of ``AGGREGATIONS`` or None
    for the loss's own (cispo: group, grpo: sequence, dapo: token, dr_grpo: fixed).
    CISPO: ``tau`` caps the importance weight, ``tau_low`` (0 = none) floors it.
    PPO-clip: ratio clipped to ``[1 - epsilon, 1 + epsilon_high]``; ``epsilon_high=None`` means
    ``epsilon`` (0.28 for dapo, its clip-higher default). The ``fixed`` aggregation divides by
    the rows' generation budget, which the batch carries (``TrainBatch.completion_budget``)."""

    name: str = "cispo"
    aggregation: str | None = None
    tau: float = 4.0
    tau_low: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None

    def __post_init__(self):
        require_in_registry(self.name, POLICY_LOSSES, "policy loss")
        if self.aggregation is not None:
            require_in_registry(self.aggregation, AGGREGATIONS, "loss aggregation")
        require(0 <= self.tau_low < self.tau, "need 0 <= tau_low < tau")
        require(0 < self.epsilon < 1, "epsilon must be in (0, 1)")
        require(self.epsilon_high is None or self.epsilon_high > 0, "epsilon_high must be > 0")

    @property
    def aggregation_name(self) -> str:
        return self.aggregation or POLICY_LOSSES[self.name].aggregation


# -- policy losses ------------------------------------------------------------------------------
@register_loss("cispo", aggregation="group")
def cispo(logp, old_logp, adv, cfg: LossConfig):
    """CISPO: ``-sg(clip(rho, tau_low, tau)) * A * logp`` with ``rho = exp(logp - old_logp)``.

    The clipped weight is stop-gradiented, so the gradient is ``-w * A * dlogp`` for every token
    (clipped tokens still get a gradient, unlike PPO-clip)."""
    rho = jnp.exp(sg(logp) - old_logp)
    w = sg(jnp.clip(rho, cfg.tau_low, cfg.tau))
    flags = {"clip_high": rho > cfg.tau, "clip_low": rho < cfg.tau_low}
    return -w * adv[:, None] * logp, flags


def ppo_clip(logp, old_logp, adv, cfg: LossConfig, default_high: float | None = None):
    """PPO-clip: ``-min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A)``."""
    eps_high = cfg.epsilon_high or default_high or cfg.epsilon
    rho = jnp.exp(logp - sg(old_logp))
    a = adv[:, None]
    clipped = jnp.clip(rho, 1.0 - cfg.epsilon, 1.0 + eps_high)
    flags = {"clip_high": (rho > 1.0 + eps_high) & (a > 0), "clip_low": (rho < 1.0 - cfg.epsilon) & (a < 0)}
    return -jnp.minimum(rho * a, clipped * a), flags


@register_loss("grpo", aggregation="sequence")
def grpo(logp, old_logp, adv, cfg: LossConfig):
    """GRPO (PPO-clip, symmetric epsilon unless ``epsilon_high`` is set), sequence mean."""
    return ppo_clip(logp, old_logp, adv, cfg)


@register_loss("dapo", aggregation="token")
def dapo(logp, old_logp, adv, cfg: LossConfig):
    """DAPO: PPO-clip with clip-higher (``epsilon_high`` default 0.28), token-level mean."""
    return ppo_clip(logp, old_logp, adv, cfg, default_high=0.28)


@register_loss("dr_grpo", aggregation="fixed")
def dr_grpo(logp, old_logp, adv, cfg: LossConfig):
    """Dr. GRPO: PPO-clip summed over tokens and divided by a constant length (no length bias)."""
    return ppo_clip(logp, old_logp, adv, cfg)


# -- aggregations -------------------------------------------------------------------------------
def _row_tokens(mask):
    return mask.sum(axis=1).astype(jnp.float32)


@register_aggregation("group")
def group_agg(mask, group_ids, budget):
    """The paper's: each group's token losses summed over the group's completion tokens, then
    a mean over groups. A row weighs ``1 / tokens(group)`` and counts ``tokens(row) / tokens(group)``
    groups, so a group (whatever rows it spans) adds exactly 1 to the denominator."""
    n = _row_tokens(mask)
    g = jax.ops.segment_sum(n, group_ids, num_segments=n.shape[0])[group_ids]
    w = jnp.where(g > 0, 1.0 / jnp.maximum(g, 1.0), 0.0)
    return w, n * w


@register_aggregation("token")
def token_agg(mask, group_ids, budget):
    """Mean over all completion tokens of the batch."""
    n = _row_tokens(mask)
    return jnp.ones_like(n), n


@register_aggregation("sequence")
def sequence_agg(mask, group_ids, budget):
    """Mean over rows of each row's token mean (rows without completion tokens do not count)."""
    n = _row_tokens(mask)
    return jnp.where(n > 0, 1.0 / jnp.maximum(n, 1.0), 0.0), (n > 0).astype(jnp.float32)


@register_aggregation("fixed")
def fixed_agg(mask, group_ids, budget):
    """Token sum over the generation budgets of the rows (Dr. GRPO, as verl: a row counts its
    ``budget``, not the row width, so prompt padding never changes the loss); rows without
    completion tokens do not count."""
    n = _row_tokens(mask)
    return jnp.ones_like(n), jnp.where(n > 0, budget, 0).astype(jnp.float32)


def aggregation_weights(cfg: LossConfig, mask, group_ids, budget):
    """``(row_weight [B], row_denom [B])`` float32 for ``cfg``'s aggregation on a whole batch;
    ``budget [B]``: the rows' generation budgets."""
    return AGGREGATIONS[cfg.aggregation_name](mask, group_ids, budget)


def weighted_sum(token_values, mask, row_weight):
    """``sum_b row_weight_b * sum_t [mask_bt] token_values_bt`` (masked entries may be non-finite)."""
    per_row = jnp.where(mask, token_values, 0.0).sum(axis=1)
    return jnp.sum(row_weight * per_row)


def policy_loss(cfg: LossConfig, logp, old_logp, adv, mask, row_weight, row_denom):
    """Unreduced ``(loss_sum, denominator, flags)``; the loss is ``loss_sum / denominator``."""
    token_loss, flags = POLICY_LOSSES[cfg.name].fn(logp, old_logp, adv, cfg)
    return weighted_sum(token_loss, mask, row_weight), row_denom.sum(), flags
