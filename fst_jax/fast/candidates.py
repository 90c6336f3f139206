"""The candidate population of the fast channel: members with lineage, the per-instance score
matrix S[k][i] over the anchor (Pareto) set, instance-level Pareto fronts, and the budget ledger.

A candidate is a dict of named text components (FST uses one, ``"context"``). Everything here is
plain data that round-trips through ``to_dict`` / ``from_dict`` as JSON.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

Candidate = dict[str, str]


@dataclasses.dataclass
class Member:
    """One candidate with its lineage.

    ``origin`` is "seed" (given at the start), "carried" (kept from an earlier round) or
    "reflection" (proposed by the reflection LM from ``parents``). ``born_step`` is the policy step
    at which the text was written; ``proposal`` the proposal index that made it (-1 for seeds).
    """

    id: int
    components: Candidate
    origin: str
    parents: list[int]
    born_step: int
    proposal: int = -1


@dataclasses.dataclass
class Population:
    """Members plus their score rows on the anchor instances (``scores[k][i]``).

    ``scored_step`` is the policy step the score matrix was computed under; scores from another
    step are stale and must be recomputed (see ``GEPAOptimizer.start``).
    """

    instance_ids: list[str]
    members: list[Member] = dataclasses.field(default_factory=list)
    scores: list[list[float]] = dataclasses.field(default_factory=list)
    scored_step: int = 0

    def add(self, components: Candidate, scores: Sequence[float], *, origin: str,
            parents: Sequence[int] = (), born_step: int, proposal: int = -1) -> Member:
        """Append a member with its full score row; returns it (ids are 0, 1, 2, ...)."""
        if len(scores) != len(self.instance_ids):
            raise ValueError(f"score row has {len(scores)} entries, anchor has {len(self.instance_ids)}")
        member = Member(len(self.members), dict(components), origin, list(parents), born_step, proposal)
        self.members.append(member)
        self.scores.append([float(s) for s in scores])
        return member

    def aggregate(self) -> list[float]:
        """Mean anchor score of every member."""
        n = max(len(self.instance_ids), 1)
        return [sum(row) / n for row in self.scores]

    def fronts(self) -> list[set[int]]:
        """Instance-level Pareto fronts: for each instance, the members with its best score."""
        return pareto_fronts(self.scores)

    def to_dict(self) -> dict[str, Any]:
        return {
            "instance_ids": list(self.instance_ids),
            "members": [dataclasses.asdict(m) for m in self.members],
            "scores": [list(r) for r in self.scores],
            "scored_step": self.scored_step,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Population":
        return cls(list(d["instance_ids"]), [Member(**m) for m in d["members"]],
                   [list(map(float, r)) for r in d["scores"]], int(d["scored_step"]))


def pareto_fronts(scores: Sequence[Sequence[float]]) -> list[set[int]]:
    """For each instance i, the set of candidates k whose ``scores[k][i]`` is the column maximum."""
    if not scores:
        return []
    fronts = []
    for i in range(len(scores[0])):
        best = max(row[i] for row in scores)
        fronts.append({k for k, row in enumerate(scores) if row[i] == best})
    return fronts


def remove_dominated(fronts: Sequence[set[int]], aggregate: Sequence[float]) -> set[int]:
    """The non-dominated candidates among those on some front.

    A candidate is dominated when every front that holds it also holds another surviving
    candidate. Candidates are examined from the lowest aggregate score up (ties: lower id first)
    and removed one at a time, restarting after each removal, so of two candidates on exactly the
    same fronts the one with the higher aggregate (then the higher id) survives. Every non-empty
    front keeps at least one survivor.
    """
    survivors = set().union(*fronts) if fronts else set()
    holding = {k: [f for f in fronts if k in f] for k in survivors}
    order = sorted(survivors, key=lambda k: (aggregate[k], k))
    removed = True
    while removed:
        removed = False
        for k in order:
            if k in survivors and all(len(f & survivors) > 1 for f in holding[k]):
                survivors.discard(k)
                removed = True
                break
    return survivors


def front_counts(fronts: Sequence[set[int]], members: set[int]) -> dict[int, int]:
    """How many fronts each of ``members`` is on (members on no front are left out)."""
    counts: dict[int, int] = {}
    for front in fronts:
        for k in front & members:
            counts[k] = counts.get(k, 0) + 1
    return counts


@dataclasses.dataclass
class Budget:
    """The ledger of one GEPA run. ``metric_calls`` counts scored rollouts (cache hits excluded):
    ``rescore_calls`` scored the round's starting population (its seeds, new or carried) on the
    anchor set, ``proposal_calls`` the proposals (minibatches, accepted children on the anchor
    set); the two add up to ``metric_calls``. ``skipped`` counts proposals that produced no
    child, by reason in ``skip_reasons``."""

    metric_calls: int = 0
    rescore_calls: int = 0
    proposal_calls: int = 0
    proposals: int = 0
    accepted: int = 0
    rejected: int = 0
    skipped: int = 0
    skip_reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    reflection_calls: int = 0
    reflection_tokens: int = 0
    reflection_failures: int = 0

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Budget":
        return cls(**d)
