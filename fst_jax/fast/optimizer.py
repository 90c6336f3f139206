"""A GEPA round: seed (and re-score) a population, then propose, test and keep reflective
mutations until a stop condition holds; extract the top-K for FST. The whole state is JSON and
is saved atomically, so a round resumes to the identical continuation.

Per FST cycle::

    result = run_gepa_round(sampler, params, task, anchor, seeds=previous.members,
                            config=cfg, policy_step=step)
    contexts = [c["context"] for c in result.contexts]   # K contexts for the RL group mix
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from fst_jax.config import require, require_in_registry
from fst_jax.fast.candidates import Budget, Candidate, Member, Population
from fst_jax.fast.evaluator import Adapter, EvalConfig, SamplerEvaluator, TextGenerator
from fst_jax.fast.reflection import (ReflectionConfig, ReflectionError, Reply, estimate_tokens,
                                     make_reflection_lm, parse_proposal, render_meta_prompt)
from fst_jax.fast.strategies import (ACCEPTANCE, SELECTORS, EpochShuffledSampler, Progress, StopLimits,
                                     stop_reason, top_k)
from fst_jax.tasks.base import Example, Task, by_id

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GEPAConfig:
    """One GEPA round. ``max_*`` limits (None = off) stop the round; the first reached wins.
    ``component`` None mutates the candidate's components in turn. A proposal is skipped
    when ``skip_perfect`` and every parent minibatch score is >= ``perfect_score``."""

    selector: str = "pareto"
    epsilon: float = 0.1
    acceptance: str = "strict_improvement"
    minibatch_size: int = 3
    skip_perfect: bool = True
    perfect_score: float = 1.0
    max_metric_calls: int | None = 960
    max_proposals: int | None = None
    max_seconds: float | None = None
    max_no_improvement: int | None = None
    top_k: int = 4
    component: str | None = None
    seed: int = 0
    reflection: ReflectionConfig = dataclasses.field(default_factory=ReflectionConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def __post_init__(self):
        require_in_registry(self.selector, SELECTORS, "candidate selector")
        require_in_registry(self.acceptance, ACCEPTANCE, "acceptance rule")
        require(0.0 <= self.epsilon <= 1.0, "epsilon must be in [0, 1]")
        require(self.minibatch_size >= 1 and self.top_k >= 1, "minibatch_size and top_k must be >= 1")
        for name in ("max_metric_calls", "max_proposals", "max_seconds", "max_no_improvement"):
            value = getattr(self, name)
            require(value is None or value > 0, f"{name} must be > 0 or null")

    def limits(self) -> StopLimits:
        return StopLimits(self.max_metric_calls, self.max_proposals, self.max_seconds, self.max_no_improvement)


class GEPAOptimizer:
    """Runs GEPA over ``anchor`` with an evaluator (an ``Adapter``) and a reflection LM.

    Call ``start(seeds)`` once (or ``load_state_dict``), then ``step()`` per proposal or ``run()``.
    Every proposal is one entry of ``history`` (outcome "accepted", "rejected" or "skipped:<reason>",
    reason one of perfect, reflection_error, malformed, empty, unchanged, overlong, duplicate).
    """

    def __init__(self, config: GEPAConfig, evaluator: Adapter,
                 reflection_lm: Callable[[str, int], Reply], anchor: Sequence[Example]):
        self.config, self.evaluator, self.reflection_lm = config, evaluator, reflection_lm
        self.anchor = list(anchor)
        self.by_id = by_id(self.anchor)
        self.minibatches = EpochShuffledSampler(list(self.by_id), config.minibatch_size, config.seed)
        self.rng = random.Random(config.seed)
        self.population = Population(list(self.by_id))
        self.budget = Budget()
        self.best = 0.0
        self.since_improvement = 0
        self.seconds = 0.0
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------ seeding

    def start(self, seeds: Sequence[Candidate | Member]) -> Population:
        """Score the seeds on the whole anchor set under the evaluator's current weights (one
        generator call). ``Member`` seeds are carried over: they keep their text and birth step,
        and their old scores are discarded, since they are stale once the weights moved. These
        metric calls and this time count toward the round's budget."""
        t0 = time.monotonic()
        if not seeds:
            raise ValueError("GEPA needs at least one seed candidate")
        step = self.evaluator.policy_step
        texts = [dict(s.components) if isinstance(s, Member) else dict(s) for s in seeds]
        if self.config.component is not None and any(self.config.component not in t for t in texts):
            raise ValueError(f"config.component {self.config.component!r} is missing from a seed candidate")
        for result, seed, text in zip(self.evaluator.evaluate_many(texts, self.anchor), seeds, texts):
            self.budget.metric_calls += result.metric_calls
            carried = isinstance(seed, Member)
            self.population.add(text, result.scores, origin="carried" if carried else "seed",
                                born_step=seed.born_step if carried else step)
        self.population.scored_step = step
        self.best = max(self.population.aggregate())
        self.seconds += time.monotonic() - t0
        return self.population

    # ------------------------------------------------------------ one proposal

    def _limit(self) -> int | None:
        return self.config.reflection.max_context_tokens or self.evaluator.max_context_tokens

    def step(self) -> dict[str, Any]:
        """One reflective-mutation proposal; returns (and appends to history) its record."""
        t0 = time.monotonic()
        cfg, pop, budget = self.config, self.population, self.budget
        index = budget.proposals
        budget.proposals += 1
        parent_id = SELECTORS[cfg.selector](pop, self.rng, cfg.epsilon)
        parent = pop.members[parent_id]
        batch = [self.by_id[i] for i in self.minibatches.next_batch()]
        record: dict[str, Any] = {"proposal": index, "parent": parent_id, "batch": [e.id for e in batch]}
        parent_eval = self.evaluator.evaluate(parent.components, batch, capture_traces=True)
        budget.metric_calls += parent_eval.metric_calls
        record["parent_scores"] = parent_eval.scores
        outcome = self._propose(index, parent, parent_eval, batch, record)
        record["outcome"] = outcome
        if outcome.startswith("skipped:"):
            budget.skip(outcome.split(":", 1)[1])
        best = max(pop.aggregate())
        self.since_improvement = 0 if best > self.best else self.since_improvement + 1
        self.best = max(best, self.best)
        record.update(metric_calls=budget.metric_calls, best=self.best)
        self.history.append(record)
        self.seconds += time.monotonic() - t0
        log.info("GEPA proposal %d: parent %d -> %s (budget %s)", index, parent_id, outcome, budget.metric_calls)
        return record

    def _propose(self, index: int, parent: Member, parent_eval, batch: list[Example], record: dict) -> str:
        cfg, budget = self.config, self.budget
        if cfg.skip_perfect and all(s >= cfg.perfect_score for s in parent_eval.scores):
            return "skipped:perfect"
        names = list(parent.components)
        component = cfg.component or names[index % len(names)]
        records = self.evaluator.make_reflective_dataset(parent.components, parent_eval, [component],
                                                         cfg.reflection.max_output_chars)[component]
        prompt = render_meta_prompt(cfg.reflection.template, parent.components[component], records)
        budget.reflection_calls += 1
        try:
            reply = self.reflection_lm(prompt, (cfg.seed * 1_000_003 + index) % 2**31)
        except ReflectionError as e:
            budget.reflection_failures += 1
            log.warning("GEPA proposal %d: reflection failed, skipped: %s", index, e)
            return "skipped:reflection_error"
        budget.reflection_tokens += reply.tokens
        text, status = parse_proposal(reply.text, parent.components[component], max_tokens=self._limit(),
                                      count=self.evaluator.count_tokens or estimate_tokens,
                                      overlong=cfg.reflection.overlong)
        record["parse"] = status
        if text is None:
            return f"skipped:{status}"
        child = {**parent.components, component: text}
        if any(m.components == child for m in self.population.members):
            return "skipped:duplicate"
        child_eval = self.evaluator.evaluate(child, batch)
        budget.metric_calls += child_eval.metric_calls
        record["child_scores"] = child_eval.scores
        if not ACCEPTANCE[cfg.acceptance](parent_eval.scores, child_eval.scores):
            budget.rejected += 1
            return "rejected"
        full = self.evaluator.evaluate(child, self.anchor)
        budget.metric_calls += full.metric_calls
        member = self.population.add(child, full.scores, origin="reflection", parents=[parent.id],
                                     born_step=self.evaluator.policy_step, proposal=index)
        budget.accepted += 1
        record["child"] = member.id
        return "accepted"

    # ------------------------------------------------------------ loop and results

    def stop_reason(self) -> str | None:
        progress = Progress(self.budget.metric_calls, self.budget.proposals, self.seconds, self.since_improvement)
        return stop_reason(self.config.limits(), progress)

    def run(self, state_path: str | Path | None = None) -> str:
        """Propose until a stop condition holds; saves the state after each proposal when
        ``state_path`` is given. Returns the stop reason."""
        while (reason := self.stop_reason()) is None:
            self.step()
            if state_path is not None:
                self.save(state_path)
        log.info("GEPA round stopped: %s; %s", reason, self.budget)
        return reason

    def top_k(self, k: int | None = None) -> list[Member]:
        """The best ``k`` (default ``config.top_k``) members by ``strategies.top_k``'s rule."""
        return [self.population.members[m] for m in top_k(self.population, k or self.config.top_k)]

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {
            "population": self.population.to_dict(),
            "budget": self.budget.to_dict(),
            "rng": [version, list(internal), gauss],
            "minibatches": self.minibatches.state(),
            "evaluator": self.evaluator.state(),
            "best": self.best,
            "since_improvement": self.since_improvement,
            "seconds": self.seconds,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved round; the anchor set and the evaluator's policy step must match."""
        population = Population.from_dict(state["population"])
        if population.instance_ids != list(self.by_id):
            raise ValueError("saved state was made on a different anchor set")
        if population.scored_step != self.evaluator.policy_step:
            raise ValueError(f"saved state is from policy step {population.scored_step}, the evaluator "
                             f"is at {self.evaluator.policy_step}: start a new round with the population carried")
        self.population, self.budget = population, Budget.from_dict(state["budget"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.minibatches = EpochShuffledSampler(list(self.by_id), self.config.minibatch_size, self.config.seed,
                                                **state["minibatches"])
        self.evaluator.load_state(state["evaluator"])
        self.best, self.since_improvement = state["best"], state["since_improvement"]
        self.seconds, self.history = state["seconds"], list(state["history"])

    def save(self, path: str | Path) -> None:
        """Write the state as JSON atomically (temporary file, then os.replace)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.state_dict()))
        os.replace(tmp, path)

    def load(self, path: str | Path) -> None:
        self.load_state_dict(json.loads(Path(path).read_text()))


@dataclasses.dataclass
class RoundResult:
    """What a GEPA round hands back: the top-K members (best first) and their candidates,
    the stop reason, the budget ledger and the optimizer (for its population and state)."""

    members: list[Member]
    contexts: list[Candidate]
    stop_reason: str
    budget: Budget
    optimizer: GEPAOptimizer


def run_gepa_round(generator: TextGenerator, params: Any, task: Task, anchor: Sequence[Example],
                   seeds: Sequence[Candidate | Member], config: GEPAConfig = GEPAConfig(), *,
                   policy_step: int = 0, reflection_lm: Callable[[str, int], Reply] | None = None,
                   reflection_fn: Callable[[str], str] | None = None,
                   state_path: str | Path | None = None) -> RoundResult:
    """One GEPA round against frozen ``params`` at ``policy_step``.

    ``seeds`` are plain candidates or Members carried from the previous round (re-scored here).
    The reflection LM is ``reflection_lm`` if given, else built from ``config.reflection``
    (``reflection_fn`` feeds the "callable" backend; "policy" uses ``generator`` with ``params``).
    With ``state_path``, an existing state file is resumed and the state is saved after
    every proposal.
    """
    evaluator = SamplerEvaluator(generator, task, config.eval, params, policy_step)
    if reflection_lm is None:
        reflection_lm = make_reflection_lm(config.reflection, generator=generator, params_fn=lambda: evaluator.params,
                                           count_tokens=evaluator.count_tokens, fn=reflection_fn)
    optimizer = GEPAOptimizer(config, evaluator, reflection_lm, anchor)
    if state_path is not None and Path(state_path).exists():
        optimizer.load(state_path)
    else:
        optimizer.start(seeds)
        if state_path is not None:
            optimizer.save(state_path)
    reason = optimizer.run(state_path)
    members = optimizer.top_k()
    return RoundResult(members, [dict(m.components) for m in members], reason, optimizer.budget, optimizer)
