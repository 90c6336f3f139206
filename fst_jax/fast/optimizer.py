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

from fst_jax import distributed
from fst_jax.config import ConfigError, require, require_in_registry
from fst_jax.fast.candidates import Budget, Candidate, Member, Population
from fst_jax.fast.contamination import LeakDetector
from fst_jax.fast.evaluator import Adapter, EvalResult, SamplerEvaluator, ScoringConfig
from fst_jax.fast.reflection import (ReflectionConfig, ReflectionError, ReflectionLM, estimate_tokens,
                                     make_reflection_lm, parse_proposal, reflect_batch, render_meta_prompt)
from fst_jax.fast.strategies import (ACCEPTANCE, SELECTORS, EpochShuffledSampler, Progress, StopLimits,
                                     stop_reason, top_k)
from fst_jax.generation import TextGenerator
from fst_jax.tasks.base import Example, Task, by_id
from fst_jax.tasks.rewards import Scorer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GEPAConfig:
    """One GEPA round. ``max_*`` limits (None = off) stop the round; the first reached wins.
    ``component`` None mutates the candidate's components in turn. A proposal is skipped
    when ``skip_perfect`` and every parent minibatch score is >= ``perfect_score``.
    ``parallel_proposals`` (P) proposals are made together in one step (see ``GEPAOptimizer``);
    the stop conditions are checked between steps, so a step may pass ``max_metric_calls`` by up
    to P proposals' rollouts (``max_proposals`` is never passed). ``leak_overlap`` (None = off)
    skips a child that leaks an anchor problem's answer its parent did not
    (``fst_jax.fast.contamination``: the answer, the problem's numbers and this share of its
    distinctive tokens).

    ``max_metric_calls`` is the search's budget: the metric calls of the proposals. Scoring the
    round's starting population on the anchor set (seeds; carried contexts are re-scored under
    the current weights) is charged on top of it, or to it with ``rescoring_counts_toward_budget``.
    ``require_affordable`` refuses a round whose budget does not buy ``min_proposals`` proposals
    when every proposal costs its worst case (``proposal_cost``): then fewer may be made."""

    selector: str = "pareto"
    epsilon: float = 0.1
    acceptance: str = "strict_improvement"
    minibatch_size: int = 3
    skip_perfect: bool = True
    perfect_score: float = 1.0
    max_metric_calls: int | None = 960
    rescoring_counts_toward_budget: bool = False
    min_proposals: int = 1
    max_proposals: int | None = None
    max_seconds: float | None = None
    max_no_improvement: int | None = None
    top_k: int = 4
    component: str | None = None
    parallel_proposals: int = 1
    leak_overlap: float | None = 0.5
    seed: int = 0
    reflection: ReflectionConfig = dataclasses.field(default_factory=ReflectionConfig)
    eval: ScoringConfig = dataclasses.field(default_factory=ScoringConfig)

    def __post_init__(self):
        require_in_registry(self.selector, SELECTORS, "candidate selector")
        require_in_registry(self.acceptance, ACCEPTANCE, "acceptance rule")
        require(0.0 <= self.epsilon <= 1.0, "epsilon must be in [0, 1]")
        require(self.minibatch_size >= 1 and self.top_k >= 1, "minibatch_size and top_k must be >= 1")
        require(self.parallel_proposals >= 1, "parallel_proposals must be >= 1")
        require(self.leak_overlap is None or 0.0 < self.leak_overlap <= 1.0, "leak_overlap must be in (0, 1] or null")
        require(self.min_proposals >= 0, "min_proposals must be >= 0")
        require(self.max_proposals is None or self.max_proposals >= self.min_proposals,
                f"max_proposals {self.max_proposals} is below min_proposals {self.min_proposals}")
        for name in ("max_metric_calls", "max_proposals", "max_seconds", "max_no_improvement"):
            value = getattr(self, name)
            require(value is None or value > 0, f"{name} must be > 0 or null")

    def limits(self) -> StopLimits:
        return StopLimits(self.max_metric_calls, self.max_proposals, self.max_seconds, self.max_no_improvement)

    def proposal_cost(self, anchor_size: int) -> int:
        """The most metric calls one proposal spends: its parent and its child on a minibatch,
        then the accepted child on all ``anchor_size`` anchor problems, each sampled
        ``eval.samples_per_example`` times (cache hits make it less)."""
        return (2 * self.minibatch_size + anchor_size) * self.eval.samples_per_example

    def round_budget(self, anchor_size: int, carried: int) -> tuple[int, int | None]:
        """(re-scoring calls of ``carried`` starting contexts, calls left to the proposals:
        None when ``max_metric_calls`` is off)."""
        rescore = carried * anchor_size * self.eval.samples_per_example
        if self.max_metric_calls is None:
            return rescore, None
        return rescore, self.max_metric_calls - (rescore if self.rescoring_counts_toward_budget else 0)

    def least_proposals(self, anchor_size: int, carried: int) -> int | None:
        """The fewest proposals a round makes before its metric-call budget runs out, every
        proposal at its worst-case cost (None: no budget); ``max_proposals`` caps it, and
        ``max_seconds`` / ``max_no_improvement`` may stop a round sooner."""
        _, search = self.round_budget(anchor_size, carried)
        if search is None:
            return None
        least = max(0, -(-search // self.proposal_cost(anchor_size)))
        return least if self.max_proposals is None else min(least, self.max_proposals)

    def require_affordable(self, anchor_size: int, carried: int) -> None:
        """Raise ``ConfigError`` (naming the numbers) when a round on ``anchor_size`` problems
        starting from ``carried`` contexts is not sure to make ``min_proposals`` proposals
        (``least_proposals``)."""
        least = self.least_proposals(anchor_size, carried)
        if least is None or least >= self.min_proposals:
            return
        rescore, search = self.round_budget(anchor_size, carried)
        cost, n = self.proposal_cost(anchor_size), self.eval.samples_per_example
        charged = (f"less re-scoring {carried} contexts x {anchor_size} anchor problems x {n} samples = "
                   f"{rescore} (rescoring_counts_toward_budget: true) " if self.rescoring_counts_toward_budget else "")
        raise ConfigError(f"a GEPA round cannot afford min_proposals={self.min_proposals} proposals (it may make "
                          f"{least}): max_metric_calls {self.max_metric_calls} {charged}leaves {search} metric calls "
                          f"for the search, and one proposal may cost {cost} (2 x minibatch {self.minibatch_size} + "
                          f"anchor {anchor_size}, x {n} samples); raise max_metric_calls to "
                          f"{self.max_metric_calls - search + (self.min_proposals - 1) * cost + 1}, "
                          f"{'charge re-scoring on top (rescoring_counts_toward_budget: false), ' if charged else ''}"
                          f"or lower min_proposals")


@dataclasses.dataclass
class _Draft:
    """One proposal in flight within a step."""

    index: int
    parent: Member
    batch: list[Example]
    record: dict[str, Any]
    parent_eval: EvalResult | None = None
    calls: int = 0
    component: str = ""
    prompt: str = ""
    child: Candidate | None = None
    child_scores: list[float] | None = None
    outcome: str = ""


class GEPAOptimizer:
    """Runs GEPA over ``anchor`` with an evaluator (an ``Adapter``) and a reflection LM.

    Call ``start(seeds)`` once (or ``load_state_dict``), then ``step()`` or ``run()``. Every
    proposal is one entry of ``history`` (outcome "accepted", "rejected" or "skipped:<reason>",
    reason one of perfect, reflection_error, malformed, empty, unchanged, overlong, leak, duplicate;
    a leak's record names the leaked example ids under "leaked"). A record holds the parent's
    and the child's minibatch scores (``parent_scores``, ``child_scores``) and, once a reply
    parsed, the proposed component text (``text``), so a round's rejected children can be read.

    A step makes P = ``config.parallel_proposals`` proposals together, in this order:

    1. P parents and P minibatches are drawn in proposal order (seeded selector RNG, epoch-shuffled
       minibatches) from the population as it was at the start of the step;
    2. every parent is scored on its minibatch with traces: ONE ``evaluate_pairs`` call;
    3. perfect parents are skipped; the others' meta-prompts go to the reflection LM in ONE
       ``reflect_batch`` call (the policy samples them together; HTTP requests run concurrently);
       replies are parsed; a child equal to a population member is skipped as a duplicate;
    4. every child is scored on its parent's minibatch: ONE ``evaluate_pairs`` call;
    5. acceptance in proposal order: a child equal to one accepted earlier in the step is
       skipped as a duplicate (its minibatch rollouts still count), else the acceptance rule
       decides; the accepted children are scored on the whole anchor set in ONE
       ``evaluate_many`` call and join the population in proposal order.

    With P = 1 this is sequential GEPA. Metric calls count every scored rollout; each
    proposal's record carries the cumulative counts after it (``metric_calls``: all of them,
    ``proposal_calls``: the proposals' alone), in proposal order.
    """

    def __init__(self, config: GEPAConfig, evaluator: Adapter,
                 reflection_lm: ReflectionLM, anchor: Sequence[Example]):
        self.config, self.evaluator, self.reflection_lm = config, evaluator, reflection_lm
        self.anchor = list(anchor)
        self.by_id = by_id(self.anchor)
        self.minibatches = EpochShuffledSampler(list(self.by_id), config.minibatch_size, config.seed)
        self.rng = random.Random(config.seed)
        self.population = Population(list(self.by_id))
        self.leaks = None if config.leak_overlap is None else LeakDetector(self.anchor, config.leak_overlap)
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
        metric calls are ``budget.rescore_calls`` (charged to ``max_metric_calls`` only with
        ``rescoring_counts_toward_budget``); this time counts toward ``max_seconds``."""
        t0 = time.monotonic()
        if not seeds:
            raise ValueError("GEPA needs at least one seed candidate")
        step = self.evaluator.policy_step
        texts = [dict(s.components) if isinstance(s, Member) else dict(s) for s in seeds]
        if self.config.component is not None and any(self.config.component not in t for t in texts):
            raise ValueError(f"config.component {self.config.component!r} is missing from a seed candidate")
        for result, seed, text in zip(self.evaluator.evaluate_many(self.anchor, texts), seeds, texts):
            self.budget.metric_calls += result.metric_calls
            self.budget.rescore_calls += result.metric_calls
            carried = isinstance(seed, Member)
            self.population.add(text, result.scores, origin="carried" if carried else "seed",
                                born_step=seed.born_step if carried else step)
        self.population.scored_step = step
        self.best = max(self.population.aggregate())
        self.seconds += time.monotonic() - t0
        return self.population

    # ------------------------------------------------------------ one step of proposals

    def _limit(self) -> int | None:
        return self.config.reflection.max_context_tokens or self.evaluator.max_context_tokens

    def step(self) -> list[dict[str, Any]]:
        """One step: ``config.parallel_proposals`` reflective-mutation proposals made together
        (fewer when ``max_proposals`` is nearer). Returns their records (also appended to
        ``history``) in proposal order; see the class docstring for the order of work."""
        t0 = time.monotonic()
        cfg, pop, budget = self.config, self.population, self.budget
        count = cfg.parallel_proposals
        if cfg.max_proposals is not None:
            count = max(1, min(count, cfg.max_proposals - budget.proposals))
        drafts = []
        for index in range(budget.proposals, budget.proposals + count):
            parent_id = SELECTORS[cfg.selector](pop, self.rng, cfg.epsilon)
            batch = [self.by_id[i] for i in self.minibatches.next_batch()]
            record = {"proposal": index, "parent": parent_id, "batch": [e.id for e in batch]}
            drafts.append(_Draft(index, pop.members[parent_id], batch, record))
        budget.proposals += count
        parent_evals = self.evaluator.evaluate_pairs([(d.batch, d.parent.components) for d in drafts])
        for d, result in zip(drafts, parent_evals, strict=True):
            d.parent_eval, d.calls = result, result.metric_calls
            d.record["parent_scores"] = result.scores
        self._reflect(drafts)
        scoring = [d for d in drafts if d.child is not None]
        child_evals = self.evaluator.evaluate_pairs([(d.batch, d.child) for d in scoring])
        for d, result in zip(scoring, child_evals, strict=True):
            d.calls += result.metric_calls
            d.record["child_scores"] = d.child_scores = result.scores
        accepted: list[_Draft] = []
        for d in scoring:
            if any(a.child == d.child for a in accepted):
                d.outcome = "skipped:duplicate"
            elif not ACCEPTANCE[cfg.acceptance](d.parent_eval.scores, d.child_scores):
                budget.rejected += 1
                d.outcome = "rejected"
            else:
                accepted.append(d)
        full = self.evaluator.evaluate_many(self.anchor, [d.child for d in accepted]) if accepted else []
        for d, result in zip(accepted, full, strict=True):
            d.calls += result.metric_calls
            member = pop.add(d.child, result.scores, origin="reflection", parents=[d.parent.id],
                             born_step=self.evaluator.policy_step, proposal=d.index)
            budget.accepted += 1
            d.record["child"], d.outcome = member.id, "accepted"
        return self._finish(drafts, time.monotonic() - t0)

    def _reflect(self, drafts: list["_Draft"]) -> None:
        """Skip perfect parents, ask the reflection LM about the rest in one batch, parse the
        replies; sets each draft's ``child`` or its skip ``outcome``."""
        cfg, budget = self.config, self.budget
        asking = []
        for d in drafts:
            if cfg.skip_perfect and all(s >= cfg.perfect_score for s in d.parent_eval.scores):
                d.outcome = "skipped:perfect"
                continue
            names = list(d.parent.components)
            d.component = cfg.component or names[d.index % len(names)]
            records = self.evaluator.make_reflective_dataset(d.parent.components, d.parent_eval, [d.component],
                                                             cfg.reflection.max_output_chars)[d.component]
            d.prompt = render_meta_prompt(cfg.reflection.template, d.parent.components[d.component], records)
            asking.append(d)
        budget.reflection_calls += len(asking)
        seeds = [(cfg.seed * 1_000_003 + d.index) % 2**31 for d in asking]
        replies = reflect_batch(self.reflection_lm, [d.prompt for d in asking], seeds) if asking else []
        for d, reply in zip(asking, replies, strict=True):
            if isinstance(reply, ReflectionError):
                budget.reflection_failures += 1
                log.warning("GEPA proposal %d: reflection failed, skipped: %s", d.index, reply)
                d.outcome = "skipped:reflection_error"
                continue
            budget.reflection_tokens += reply.tokens
            current = d.parent.components[d.component]
            text, status = parse_proposal(reply.text, current, max_tokens=self._limit(),
                                          count=self.evaluator.count_tokens or estimate_tokens,
                                          overlong=cfg.reflection.overlong)
            d.record["parse"] = status
            if text is None:
                d.outcome = f"skipped:{status}"
                continue
            d.record["text"] = text
            if self.leaks is not None:
                already = set(self.leaks.leaked(current))
                leaked = [i for i in self.leaks.leaked(text) if i not in already]
                if leaked:
                    d.record["leaked"], d.outcome = leaked, "skipped:leak"
                    continue
            child = {**d.parent.components, d.component: text}
            if any(m.components == child for m in self.population.members):
                d.outcome = "skipped:duplicate"
                continue
            d.child = child

    def _finish(self, drafts: list["_Draft"], seconds: float) -> list[dict[str, Any]]:
        """Book the step's proposals in order: outcome, skip reasons, cumulative metric calls and
        the best aggregate score as of each proposal (members added by later proposals of the
        step do not count toward an earlier proposal's ``best``)."""
        budget, pop = self.budget, self.population
        aggregate = pop.aggregate()
        visible = len(pop.members) - sum(d.outcome == "accepted" for d in drafts)
        for d in drafts:
            record = d.record
            record["outcome"] = d.outcome
            if d.outcome.startswith("skipped:"):
                budget.skip(d.outcome.split(":", 1)[1])
            visible += d.outcome == "accepted"
            budget.metric_calls += d.calls
            budget.proposal_calls += d.calls
            best = max(aggregate[:visible])
            self.since_improvement = 0 if best > self.best else self.since_improvement + 1
            self.best = max(best, self.best)
            record.update(metric_calls=budget.metric_calls, proposal_calls=budget.proposal_calls, best=self.best)
            self.history.append(record)
            log.info("GEPA proposal %d: parent %d -> %s (budget %s)", d.index, d.parent.id, d.outcome,
                     budget.metric_calls)
        self.seconds += seconds
        return [d.record for d in drafts]

    # ------------------------------------------------------------ loop and results

    def charged_calls(self) -> int:
        """The metric calls charged to ``max_metric_calls``: the proposals', plus the re-scoring's
        with ``rescoring_counts_toward_budget``."""
        b = self.budget
        return b.proposal_calls + (b.rescore_calls if self.config.rescoring_counts_toward_budget else 0)

    def stop_reason(self) -> str | None:
        progress = Progress(self.charged_calls(), self.budget.proposals, self.seconds, self.since_improvement)
        return stop_reason(self.config.limits(), progress)

    def run(self, state_path: str | Path | None = None) -> str:
        """Step until a stop condition holds; saves the state after each step when ``state_path``
        is given. Returns the stop reason. With several processes the decision is process 0's,
        broadcast to all (``max_seconds`` reads each process's own clock), so every process
        stops after the same proposal; every process must call this."""
        while (reason := distributed.broadcast_host_object(self.stop_reason())) is None:
            self.step()
            if state_path is not None:
                self.save(state_path)
        log.info("GEPA round stopped: %s; %s", reason, self.budget)
        b, cap, step = self.budget, self.config.max_metric_calls, self.evaluator.policy_step
        if b.reflection_calls and b.reflection_failures == b.reflection_calls:
            log.error("GEPA round at policy step %d: all %d reflections failed (see the warnings above): "
                      "the population did not change", step, b.reflection_calls)
        if reason.startswith("proposals") and cap is not None and self.charged_calls() < cap / 2:
            log.warning("GEPA round at policy step %d stopped at max_proposals with %d of its %d metric "
                        "calls spent (children rejected on the minibatch are never scored on the anchor): "
                        "raise max_proposals to spend the budget", step, self.charged_calls(), cap)
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
                   policy_step: int = 0, reflection_lm: ReflectionLM | None = None,
                   reflection_fn: Callable[[str], str] | None = None,
                   state_path: str | Path | None = None, scorer: Scorer | None = None) -> RoundResult:
    """One GEPA round against frozen ``params`` at ``policy_step``.

    ``seeds`` are plain candidates or Members carried from the previous round (re-scored here).
    The reflection LM is ``reflection_lm`` if given, else built from ``config.reflection``
    (``reflection_fn`` feeds the "callable" backend; "policy" uses ``generator`` with ``params``).
    With ``state_path``, an existing state file is resumed and the state is saved after
    every step (of ``config.parallel_proposals`` proposals). ``scorer`` scores the rollouts
    (default: serially in-process).
    """
    evaluator = SamplerEvaluator(generator, task, config.eval, params, policy_step, scorer)
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
