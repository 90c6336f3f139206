"""KL penalty to the frozen reference (base) model: k1, k2, k3 estimators, registered by name.

Each estimator maps the trainer's ``logp [B, T]`` (differentiable) and the reference's
``ref_logp [B, T]`` (constant) of the sampled tokens to a per-token value whose mean estimates
``KL(pi_theta || pi_ref)`` on samples from ``pi_theta``. With ``d = ref_logp - logp`` and
``r = exp(d) = pi_ref / pi_theta`` (Schulman's k1/k2/k3; gradients as analysed by Tang & Munos
2025, arXiv 2506.09477), using the estimator *as a loss term* gives the autodiff gradients:

- k1 = ``-d``: unbiased value; gradient ``grad logp``, whose expectation on-policy is 0, so
  k1-as-loss does not pull towards the reference at all in expectation.
- k2 = ``d**2 / 2``: biased value (exact to second order); gradient ``-d * grad logp``, which
  on-policy is the gradient of the reverse KL ``KL(pi_theta || pi_ref)``.
- k3 = ``r - 1 - d``: unbiased, non-negative value; gradient ``(1 - r) * grad logp``, which
  on-policy is the gradient of the *forward* KL ``KL(pi_ref || pi_theta)``, not the reverse.

The penalty is ``beta * aggregate(k(...))``; the train step logs the estimator's value apart
from that loss term. ``d`` is clipped to ``[-20, 20]`` inside k3's exponential.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from fst_jax.registry import register
from fst_jax.config import require, require_in_registry

KLFn = Callable[[jax.Array, jax.Array], jax.Array]
KL_ESTIMATORS: dict[str, KLFn] = {}


# Decorator adding ``fn(logp, ref_logp) -> per-token estimate``.
register_kl = functools.partial(register, KL_ESTIMATORS)


@dataclasses.dataclass(frozen=True)
class KLConfig:
    """``estimator``: a key of ``KL_ESTIMATORS``; ``beta``: penalty weight (0 disables the KL
    term and the reference forward pass entirely)."""

    estimator: str = "k3"
    beta: float = 0.001

    def __post_init__(self):
        require_in_registry(self.estimator, KL_ESTIMATORS, "KL estimator")
        require(self.beta >= 0, "kl beta must be >= 0")


@register_kl("k1")
def k1(logp, ref_logp):
    """``logp - ref_logp``."""
    return logp - ref_logp


@register_kl("k2")
def k2(logp, ref_logp):
    """``(logp - ref_logp)**2 / 2``."""
    return 0.5 * (logp - ref_logp) ** 2


@register_kl("k3")
def k3(logp, ref_logp):
    """``exp(d) - 1 - d`` with ``d = ref_logp - logp``."""
    d = jnp.clip(ref_logp - logp, -20.0, 20.0)
    return jnp.exp(d) - 1.0 - d
