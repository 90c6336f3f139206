"""Policy-gradient losses and token aggregations, registered by name.

Every policy loss gets one ``LossInput`` (built by ``loss_input``, the only place one is built)
and returns ``(token_loss [B, T], flags)``: a per-token loss and named ``[B, T]`` bool arrays
(e.g. where clipping was active). A new loss is one ``@register_loss`` function, whatever of the
input it reads (ratios, reference log-probs, entropy, groups, temperature).
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
from fst_jax.rl.batch import TrainBatch

sg = jax.lax.stop_gradient


class LossInput(NamedTuple):
    """What every policy loss receives (a pytree; leading axis ``B``, the rows).

    Alignment as ``rl.batch``: every ``[B, T]`` array at index ``t`` refers to token ``t``,
    predicted from tokens ``< t``.
    logp: float32 ``[B, T]``, the trainer's log-probs (differentiable);
    sampler_logp, ref_logp: float32 ``[B, T]``, the sampler's and the reference model's
    (``ref_logp`` is 0 when the KL term is off); all three under ``logits / temperature``;
    advantages: float32 ``[B]``; mask: bool ``[B, T]``, the loss tokens (``TrainBatch.loss_mask``:
    completion tokens of the rows the loss keeps; only they count); group_ids: int32 ``[B]``
    (problem, in ``[0, B)``); entropy: float32 ``[B, T]``, the trainer's entropy at each
    position (no gradient); temperature: float32 ``[B]``, each row's sampling temperature (> 0).
    """

    logp: jax.Array
    sampler_logp: jax.Array
    ref_logp: jax.Array
    advantages: jax.Array
    mask: jax.Array
    group_ids: jax.Array
    entropy: jax.Array
    temperature: jax.Array


def loss_input(batch: TrainBatch, logp, entropy) -> LossInput:
    """The ``LossInput`` of ``batch`` (the whole batch or a micro-batch) with the trainer's
    ``logp`` and ``entropy`` ``[B, T]`` of its tokens."""
    return LossInput(logp=logp, sampler_logp=batch.sampler_logp, ref_logp=batch.ref_logp,
                     advantages=batch.advantages, mask=batch.loss_mask, group_ids=batch.group_ids,
                     entropy=sg(entropy), temperature=batch.temperature)


class PolicyLoss(NamedTuple):
    fn: Callable
    aggregation: str  # the loss's own aggregation, used when the config names none


POLICY_LOSSES: dict[str, PolicyLoss] = {}
AGGREGATIONS: dict[str, Callable] = {}


def register_loss(name: str, aggregation: str):
    """Decorator: register ``fn(inp: LossInput, cfg: LossConfig) -> (token_loss [B, T], flags)``
    with ``aggregation`` (a key of ``AGGREGATIONS``) as its default."""

    def deco(fn):
        POLICY_LOSSES[name] = PolicyLoss(fn, aggregation)
        return fn

    return deco


# Decorator adding ``fn(mask, group_ids, budget) -> (row_weight, row_denom)``.
register_aggregation = functools.partial(register, AGGREGATIONS)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """``name``: a key of ``POLICY_LOSSES``. ``aggregation``: a key of ``AGGREGATIONS`` or None
    for the loss's own (cispo: group, grpo: sequence, dapo: token, dr_grpo: fixed, gspo: sequence).
    CISPO: ``tau`` caps the importance weight, ``tau_low`` (0 = none) floors it.
    PPO-clip: ratio clipped to ``[1 - epsilon, 1 + epsilon_high]``; ``epsilon_high=None`` means
    ``epsilon`` (0.28 for dapo, its clip-higher default). GSPO clips its sequence ratio with the
    same two fields, which the user sets to GSPO's much smaller ranges (the paper: 3e-4 / 4e-4).
    The ``fixed`` aggregation divides by the rows' generation budget, which the batch carries
    (``TrainBatch.completion_budget``)."""

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
def cispo(inp: LossInput, cfg: LossConfig):
    """CISPO: ``-sg(clip(rho, tau_low, tau)) * A * logp`` with ``rho = exp(logp - sampler_logp)``.

    The clipped weight is stop-gradiented, so the gradient is ``-w * A * dlogp`` for every token
    (clipped tokens still get a gradient, unlike PPO-clip)."""
    rho = jnp.exp(sg(inp.logp) - inp.sampler_logp)
    w = sg(jnp.clip(rho, cfg.tau_low, cfg.tau))
    flags = {"clip_high": rho > cfg.tau, "clip_low": rho < cfg.tau_low}
    return -w * inp.advantages[:, None] * inp.logp, flags


def ppo_clip(ratio, a, cfg: LossConfig, default_high: float | None = None):
    """PPO-clip ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)`` and its clip flags,
    for importance ratios ``ratio`` and advantages ``a`` broadcast together."""
    eps_high = cfg.epsilon_high or default_high or cfg.epsilon
    clipped = jnp.clip(ratio, 1.0 - cfg.epsilon, 1.0 + eps_high)
    flags = {"clip_high": (ratio > 1.0 + eps_high) & (a > 0),
             "clip_low": (ratio < 1.0 - cfg.epsilon) & (a < 0)}
    return -jnp.minimum(ratio * a, clipped * a), flags


def token_ratio(inp: LossInput):
    """Per-token importance ratio ``exp(logp - sg(sampler_logp))`` ``[B, T]``."""
    return jnp.exp(inp.logp - sg(inp.sampler_logp))


@register_loss("grpo", aggregation="sequence")
def grpo(inp: LossInput, cfg: LossConfig):
    """GRPO (PPO-clip, symmetric epsilon unless ``epsilon_high`` is set), sequence mean."""
    return ppo_clip(token_ratio(inp), inp.advantages[:, None], cfg)


@register_loss("dapo", aggregation="token")
def dapo(inp: LossInput, cfg: LossConfig):
    """DAPO: PPO-clip with clip-higher (``epsilon_high`` default 0.28), token-level mean."""
    return ppo_clip(token_ratio(inp), inp.advantages[:, None], cfg, default_high=0.28)


@register_loss("dr_grpo", aggregation="fixed")
def dr_grpo(inp: LossInput, cfg: LossConfig):
    """Dr. GRPO: PPO-clip summed over tokens and divided by a constant length (no length bias)."""
    return ppo_clip(token_ratio(inp), inp.advantages[:, None], cfg)


@register_loss("gspo", aggregation="sequence")
def gspo(inp: LossInput, cfg: LossConfig):
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): PPO-clip on the sequence
    ratio ``s = exp(mean over the row's loss tokens of (logp - sampler_logp))``, the gradient
    flowing through ``s``. Every token of a row carries the row's ``-min(s * A, clip(s) * A)``,
    so the sequence aggregation gives the mean over rows of that objective; the flags mark every
    token of a clipped row. Set ``epsilon`` / ``epsilon_high`` to GSPO's ranges (see LossConfig)."""
    n = jnp.maximum(inp.mask.sum(axis=1), 1)
    log_ratio = jnp.where(inp.mask, inp.logp - sg(inp.sampler_logp), 0.0).sum(axis=1) / n
    loss, flags = ppo_clip(jnp.exp(log_ratio), inp.advantages, cfg)
    per_token = lambda v: jnp.broadcast_to(v[:, None], inp.logp.shape)
    return per_token(loss), {name: per_token(f) for name, f in flags.items()}


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


def policy_loss(cfg: LossConfig, inp: LossInput, row_weight, row_denom):
    """Unreduced ``(loss_sum, denominator, flags)`` of ``cfg``'s loss over ``inp.mask``; the loss
    is ``loss_sum / denominator``."""
    token_loss, flags = POLICY_LOSSES[cfg.name].fn(inp, cfg)
    return weighted_sum(token_loss, inp.mask, row_weight), row_denom.sum(), flags
