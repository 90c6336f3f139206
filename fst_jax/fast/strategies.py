"""Small, swappable GEPA strategies, each a function in a registry filled by a decorator.

- ``SELECTORS[name](population, rng, epsilon) -> member id``: which parent to mutate.
- ``ACCEPTANCE[name](parent_scores, child_scores) -> bool``: keep the child or not (minibatch).
- ``STOPPERS[name](limits, progress) -> reason | None``: every registered stopper is checked.
- ``EpochShuffledSampler``: minibatches of anchor ids, reshuffled each epoch, resumable.
- ``top_k``: the K contexts FST carries from a GEPA round into RL.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Sequence

from fst_jax.registry import register
from fst_jax.fast.candidates import Population, front_counts, remove_dominated

Selector = Callable[[Population, random.Random, float], int]
Acceptance = Callable[[Sequence[float], Sequence[float]], bool]

SELECTORS: dict[str, Selector] = {}
ACCEPTANCE: dict[str, Acceptance] = {}
STOPPERS: dict[str, Callable[["StopLimits", "Progress"], str | None]] = {}


def _best(population: Population) -> int:
    agg = population.aggregate()
    return max(range(len(agg)), key=lambda k: (agg[k], -k))


@register(SELECTORS, "pareto")
def select_pareto(population: Population, rng: random.Random, epsilon: float = 0.0) -> int:
    """Sample a non-dominated front member with probability proportional to its front count."""
    fronts = population.fronts()
    survivors = remove_dominated(fronts, population.aggregate())
    counts = front_counts(fronts, survivors)
    ids = sorted(counts)
    return rng.choices(ids, weights=[counts[k] for k in ids])[0]


@register(SELECTORS, "current_best")
def select_current_best(population: Population, rng: random.Random, epsilon: float = 0.0) -> int:
    """The member with the highest aggregate anchor score (ties: the oldest)."""
    return _best(population)


@register(SELECTORS, "epsilon_greedy")
def select_epsilon_greedy(population: Population, rng: random.Random, epsilon: float = 0.1) -> int:
    """With probability ``epsilon`` a uniformly random member, otherwise the current best."""
    if rng.random() < epsilon:
        return rng.randrange(len(population.members))
    return _best(population)


@register(ACCEPTANCE, "strict_improvement")
def accept_strict(parent_scores: Sequence[float], child_scores: Sequence[float]) -> bool:
    """Accept when the child's minibatch score sum is strictly higher."""
    return sum(child_scores) > sum(parent_scores)


@register(ACCEPTANCE, "improvement_or_equal")
def accept_improvement_or_equal(parent_scores: Sequence[float], child_scores: Sequence[float]) -> bool:
    """Accept when the child's minibatch score sum is at least the parent's."""
    return sum(child_scores) >= sum(parent_scores)


@dataclasses.dataclass(frozen=True)
class StopLimits:
    """Stop limits of a GEPA round; ``None`` switches a limit off."""

    max_metric_calls: int | None = None
    max_proposals: int | None = None
    max_seconds: float | None = None
    max_no_improvement: int | None = None


@dataclasses.dataclass(frozen=True)
class Progress:
    """What stoppers look at: budget so far, wall seconds, proposals since the best improved."""

    metric_calls: int
    proposals: int
    seconds: float
    since_improvement: int


@register(STOPPERS, "metric_calls")
def stop_on_metric_calls(limits: StopLimits, p: Progress) -> str | None:
    if limits.max_metric_calls is not None and p.metric_calls >= limits.max_metric_calls:
        return f"metric calls {p.metric_calls} >= {limits.max_metric_calls}"
    return None


@register(STOPPERS, "proposals")
def stop_on_proposals(limits: StopLimits, p: Progress) -> str | None:
    if limits.max_proposals is not None and p.proposals >= limits.max_proposals:
        return f"proposals {p.proposals} >= {limits.max_proposals}"
    return None


@register(STOPPERS, "wall_time")
def stop_on_wall_time(limits: StopLimits, p: Progress) -> str | None:
    if limits.max_seconds is not None and p.seconds >= limits.max_seconds:
        return f"wall time {p.seconds:.1f}s >= {limits.max_seconds}s"
    return None


@register(STOPPERS, "no_improvement")
def stop_on_no_improvement(limits: StopLimits, p: Progress) -> str | None:
    if limits.max_no_improvement is not None and p.since_improvement >= limits.max_no_improvement:
        return f"no improvement for {p.since_improvement} proposals"
    return None


def stop_reason(limits: StopLimits, progress: Progress) -> str | None:
    """The first reason any registered stopper gives, or None to go on."""
    for stopper in STOPPERS.values():
        reason = stopper(limits, progress)
        if reason is not None:
            return reason
    return None


class EpochShuffledSampler:
    """Minibatches of ``batch_size`` ids; each epoch is a fresh permutation of all ids.

    Epoch e's order is ``random.Random(f"{seed}:{e}")``'s shuffle, so the position (epoch, pos)
    is the whole state. A batch that runs past the end of an epoch is completed from the next
    one, skipping ids already in the batch (ids repeat only when batch_size > len(ids)).
    """

    def __init__(self, ids: Sequence[str], batch_size: int = 3, seed: int = 0, epoch: int = 0, pos: int = 0):
        if not ids or batch_size < 1:
            raise ValueError("need at least one id and batch_size >= 1")
        self.ids, self.batch_size, self.seed = list(ids), batch_size, seed
        self.epoch, self.pos = epoch, pos
        self._order = self._shuffled(epoch)

    def _shuffled(self, epoch: int) -> list[str]:
        order = list(self.ids)
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self) -> list[str]:
        batch: list[str] = []
        while len(batch) < self.batch_size:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            item = self._order[self.pos]
            self.pos += 1
            if item not in batch or len(self.ids) < self.batch_size:
                batch.append(item)
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}


def top_k(population: Population, k: int) -> list[int]:
    """The member ids FST carries into RL, best first: slot 0 is the member with the highest
    aggregate anchor score, the one every consumer calls "the best context".

    Rule: slot 0 is the highest aggregate (ties: a Pareto member first, then front coverage, on
    more instance fronts first, then age, older = lower id first), whether or not dominance
    removal kept it. The other slots rank the Pareto members (front members left after removing
    dominated ones, see ``remove_dominated``) before the rest, each group by aggregate anchor
    score, then coverage, then age, so the carried contexts stay diverse. A population smaller
    than ``k`` is returned whole.
    """
    fronts = population.fronts()
    agg = population.aggregate()
    pareto = remove_dominated(fronts, agg)
    coverage = front_counts(fronts, set(range(len(agg))))
    best = min(range(len(agg)), key=lambda m: (-agg[m], m not in pareto, -coverage.get(m, 0), m))
    rest = sorted((m for m in range(len(agg)) if m != best),
                  key=lambda m: (m not in pareto, -agg[m], -coverage.get(m, 0), m))
    return ([best] + rest)[:k]
