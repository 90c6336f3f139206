"""Rollouts: problems x contexts x samples -> one generator call -> rewards -> a ``TrainBatch``.

The one place that turns ``Samples`` into training rows. For ``P`` problems, ``K`` contexts and
``G`` samples per problem (``K`` divides ``G``), the generator gets the ``P * K`` prompts
``[context_k | problem_p]`` (problem-major) and draws ``G / K`` samples of each, so the contexts
are mixed inside every problem's group and each (context, problem) prompt is prefilled once.
Row ``r`` of the result is sample ``r % (G/K)`` of prompt ``r // (G/K)``: problem
``r // G``, context ``(r // (G/K)) % K``.

Advantages are computed once per group: ``group_by="problem"`` (FST: all ``G`` rollouts of a
problem, whatever context each used) or ``"problem_context"`` (a per-context baseline, the E-SPL
style ablation). The batch's prompt columns are the generator's own (same buckets, same left
padding), and its completion width is its ``config.max_new_tokens``, so every step of a run has
the same shape.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fst_jax.generation import Generator
from fst_jax.rl.advantages import AdvantageConfig
from fst_jax.rl.batch import TrainBatch, build_train_batch
from fst_jax.rl.lora import apply_lora
from fst_jax.rl.train_step import LearnerConfig, TrainState
from fst_jax.tasks.base import Example
from fst_jax.tasks.rewards import Scorer


@dataclasses.dataclass
class Rollout:
    """One step's rollouts. ``batch`` is a host ``TrainBatch`` of ``P * G`` rows; the per-row
    arrays (``rewards`` float32, ``problem_ids``/``context_ids`` int32, ``finished`` bool,
    ``lengths`` int32) and lists (``completions``, ``feedbacks``) are in row order.
    ``seconds`` holds the phases ``rollout`` (sampling) and ``reward``."""

    batch: TrainBatch
    rewards: np.ndarray
    problem_ids: np.ndarray
    context_ids: np.ndarray
    finished: np.ndarray
    lengths: np.ndarray
    completions: list[str]
    feedbacks: list[str]
    contexts: list[str]
    seconds: dict[str, float]

    def reward_per_context(self) -> list[float]:
        """Mean reward of each context's rows, in context order."""
        return [float(self.rewards[self.context_ids == k].mean()) for k in range(len(self.contexts))]

    def kept_fraction(self) -> float:
        """Fraction of rows left in the loss (groups with zero reward variance may be dropped)."""
        return float(np.asarray(self.batch.loss_mask).any(1)[:len(self.rewards)].mean())


def check_group_mix(samples_per_problem: int, num_contexts: int) -> int:
    """Samples per (context, problem) prompt, ``G / K``; ValueError unless ``K`` divides ``G``."""
    if num_contexts < 1 or samples_per_problem % num_contexts:
        raise ValueError(f"{num_contexts} contexts do not divide a group of {samples_per_problem} "
                         "samples per problem evenly")
    return samples_per_problem // num_contexts


def rollout(generator: Generator, params: Any, problems: Sequence[Example], contexts: Sequence[str],
            samples_per_problem: int, scorer: Scorer, *, seed: int,
            advantage: AdvantageConfig = AdvantageConfig()) -> Rollout:
    """Sample ``samples_per_problem`` completions of every problem with ``contexts`` mixed in
    each group, score them with ``scorer`` (never raising: ``RewardPool``'s contract) and build
    the train batch (see the module docstring)."""
    K, G = len(contexts), samples_per_problem
    n = check_group_mix(G, K)
    t0 = time.perf_counter()
    prompts = generator.encode([(c, ex.prompt) for ex in problems for c in contexts])
    samples = generator.generate(params, prompts, n=n, seed=seed)
    t1 = time.perf_counter()
    rows = np.arange(len(problems) * G)
    prompt_of_row = rows // n
    problem_ids = (rows // G).astype(np.int32)
    context_ids = (prompt_of_row % K).astype(np.int32)
    completions = [generator.decode_row(samples, r) for r in rows]
    graded = scorer.score([problems[p] for p in problem_ids], completions)
    rewards = np.array([s for s, _ in graded], np.float32)
    t2 = time.perf_counter()
    groups = problem_ids if advantage.group_by == "problem" else problem_ids * K + context_ids
    m = prompts.mask
    batch = build_train_batch(
        [prompts.tokens[p][m[p]] for p in prompt_of_row],
        [samples.tokens[r, :samples.lengths[r]] for r in rows],
        [samples.logprobs[r, :samples.lengths[r]] for r in rows],
        rewards, groups, context_ids, pad_id=generator.tokenizer.pad_id, advantage=advantage,
        prompt_buckets=generator.config.prompt_buckets, completion_buckets=(samples.tokens.shape[1],),
        temperature=samples.temperature[rows])
    return Rollout(batch, rewards, problem_ids, context_ids, samples.finished, samples.lengths,
                   completions, [f for _, f in graded], list(contexts),
                   {"rollout": t1 - t0, "reward": t2 - t1})


def sampling_weights(state: TrainState, cfg: LearnerConfig) -> nnx.State:
    """The current policy's weights for the sampler: base weights with LoRA merged in, as fresh
    arrays, so they stay valid after ``train_step`` donates ``state``."""
    weights = jax.tree.map(jnp.copy, state.weights())
    return apply_lora(weights, state.lora, cfg.lora) if cfg.lora.enabled else weights
