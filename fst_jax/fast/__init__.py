"""The fast-weights channel: GEPA over a population of text contexts (host side)."""

from fst_jax.fast.candidates import Budget, Candidate, Member, Population, front_counts, pareto_fronts, remove_dominated
from fst_jax.fast.evaluator import Adapter, EvalResult, SamplerEvaluator, ScoringConfig, Trace, render_context
from fst_jax.fast.optimizer import GEPAConfig, GEPAOptimizer, RoundResult, run_gepa_round
from fst_jax.fast.reflection import (REFLECTION_BACKENDS, ReflectionConfig, ReflectionError, ReplayCache,
                                     ReplayMissError, Reply, make_reflection_lm, parse_proposal, render_meta_prompt)
from fst_jax.fast.strategies import ACCEPTANCE, SELECTORS, STOPPERS, EpochShuffledSampler, top_k

__all__ = [
    "ACCEPTANCE", "Adapter", "REFLECTION_BACKENDS", "SELECTORS", "STOPPERS", "Budget", "Candidate", "EpochShuffledSampler",
    "EvalResult", "GEPAConfig", "GEPAOptimizer", "Member", "Population", "ReflectionConfig",
    "ReflectionError", "ReplayCache", "ReplayMissError", "Reply", "RoundResult", "SamplerEvaluator", "ScoringConfig",
    "Trace", "front_counts", "make_reflection_lm", "pareto_fronts", "parse_proposal", "remove_dominated",
    "render_context", "render_meta_prompt", "run_gepa_round", "top_k",
]
