"""Scoring candidates: the adapter interface and its implementation on the sampler.

``SamplerEvaluator.evaluate_pairs`` scores many candidates, each on its own batch of examples
(``evaluate_many``: all on one batch), with ONE ``generate_text`` call: the candidate's text is
the context (system prompt), the example's prompt the user message. Rollouts are cached by
(policy step, example id, candidate text); every freshly scored rollout counts one metric call,
cache hits count none. With ``samples_per_example > 1`` an example's score is the mean over its
samples. The fresh completions of one call are scored together by one ``scorer.score`` call
(a ``RewardPool``: parallel, with timeouts), serially in-process when no scorer is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Protocol, Sequence

from fst_jax.config import require
from fst_jax.fast.candidates import Candidate
from fst_jax.fast.reflection import reflective_record
from fst_jax.generation import TextGenerator
from fst_jax.tasks.base import Example, Task
from fst_jax.tasks.rewards import RewardConfig, RewardPool, Scorer


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
    """Sampling for scoring; ``None`` keeps the generator's default for that knob."""

    samples_per_example: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0

    def __post_init__(self):
        require(self.samples_per_example >= 1, "samples_per_example must be >= 1")
        require(self.temperature is None or self.temperature >= 0, "temperature must be >= 0")


@dataclasses.dataclass
class Trace:
    """The trace of one example under one candidate: every sample with its score and feedback."""

    example_id: str
    inputs: str
    outputs: list[str]
    scores: list[float]
    feedbacks: list[str]

    @property
    def score(self) -> float:
        return sum(self.scores) / len(self.scores)


@dataclasses.dataclass
class EvalResult:
    """Per-example mean scores and traces of one candidate on one batch, in batch order.
    ``metric_calls`` is the number of samples scored fresh (not from the cache)."""

    scores: list[float]
    traces: list[Trace]
    metric_calls: int

    @property
    def outputs(self) -> list[list[str]]:
        """The generated completions, per example, per sample."""
        return [t.outputs for t in self.traces]


class Adapter(Protocol):
    """What the GEPA optimizer needs from an evaluator: scoring with traces, the reflective
    dataset, the policy step scores belong to, an optional context-token counter and limit,
    and a JSON-able state (cache, counters) for save/resume."""

    policy_step: int
    count_tokens: Callable[[str], int] | None
    max_context_tokens: int | None

    def evaluate(self, batch: Sequence[Example], candidate: Candidate, capture_traces: bool = False) -> EvalResult: ...

    def evaluate_many(self, batch: Sequence[Example], candidates: Sequence[Candidate]) -> list[EvalResult]: ...

    def evaluate_pairs(self, items: Sequence[tuple[Sequence[Example], Candidate]]) -> list[EvalResult]: ...

    def make_reflective_dataset(self, candidate: Candidate, result: EvalResult, components: Sequence[str],
                                max_output_chars: int = 2000) -> dict[str, list[dict[str, str]]]: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


def render_context(candidate: Candidate) -> str:
    """The context text of a candidate: its components joined by blank lines, in order."""
    return "\n\n".join(candidate.values())


class SamplerEvaluator:
    """The adapter on a text generator (the real Sampler or a fake) and a task.

    ``params`` and ``policy_step`` are the current weights and their step; ``set_policy`` moves
    them and drops cache entries of other steps. ``count_tokens``/``max_context_tokens`` are
    taken from ``generator.tokenizer`` when it offers them. ``scorer`` scores completions (a
    ``Scorer`` of the same task, such as a ``RewardPool``; the caller owns and closes it); None
    scores serially here.
    """

    def __init__(self, generator: TextGenerator, task: Task, config: ScoringConfig = ScoringConfig(),
                 params: Any = None, policy_step: int = 0, scorer: Scorer | None = None):
        if scorer is not None and getattr(scorer.task, "name", None) != getattr(task, "name", None):
            raise ValueError(f"scorer is for task {getattr(scorer.task, 'name', None)!r}, "
                             f"not {getattr(task, 'name', None)!r}")
        self.generator, self.task, self.config = generator, task, config
        self.scorer = scorer if scorer is not None else RewardPool(task, RewardConfig(workers=0))
        self.params, self.policy_step = params, policy_step
        self.calls = 0  # generate_text calls so far; seeds each call
        self.cache: dict[str, dict[str, Any]] = {}
        tokenizer = getattr(generator, "tokenizer", None)
        self.count_tokens: Callable[[str], int] | None = getattr(tokenizer, "count_context_tokens", None)
        self.max_context_tokens: int | None = getattr(tokenizer, "max_context_tokens", None)

    def set_policy(self, params: Any, policy_step: int) -> None:
        self.params, self.policy_step = params, policy_step
        self.cache = {k: v for k, v in self.cache.items() if k.startswith(f"{policy_step}|")}

    def _key(self, context: str, example_id: str) -> str:
        digest = hashlib.sha256(context.encode("utf-8")).hexdigest()[:32]
        return f"{self.policy_step}|{example_id}|{digest}"

    def evaluate_many(self, batch: Sequence[Example], candidates: Sequence[Candidate]) -> list[EvalResult]:
        """Score every candidate on every example of ``batch``; one generator call for the misses."""
        return self.evaluate_pairs([(batch, c) for c in candidates])

    def evaluate_pairs(self, items: Sequence[tuple[Sequence[Example], Candidate]]) -> list[EvalResult]:
        """Score each (batch, candidate) item, one result per item in order; one generator call
        for the misses of all items. A sample shared by items is charged to the first."""
        scored = [(render_context(c), list(batch)) for batch, c in items]
        missing: dict[str, tuple[str, Example]] = {}
        for context, batch in scored:
            for ex in batch:
                key = self._key(context, ex.id)
                if key not in self.cache:
                    missing.setdefault(key, (context, ex))
        fresh: dict[str, int] = {}
        if missing:
            cfg, n = self.config, self.config.samples_per_example
            pairs = [(context, ex.prompt) for context, ex in missing.values()]
            seed = (cfg.seed * 1_000_003 + self.policy_step * 7_919 + self.calls) % 2**31
            self.calls += 1
            completions = self.generator.generate_text(self.params, pairs, n=n, seed=seed, temperature=cfg.temperature,
                                                       top_p=cfg.top_p, top_k=cfg.top_k)
            if len(completions) != len(pairs) or any(len(c) != n for c in completions):
                raise ValueError(f"generator returned {len(completions)} groups for {len(pairs)} pairs (n={n})")
            flat_examples = [ex for _, ex in missing.values() for _ in range(n)]
            graded = self.scorer.score(flat_examples, [out for outs in completions for out in outs])
            for i, ((key, (_, ex)), outs) in enumerate(zip(missing.items(), completions)):
                mine = graded[i * n:(i + 1) * n]
                self.cache[key] = dataclasses.asdict(Trace(ex.id, ex.prompt, list(outs),
                                                             [s for s, _ in mine], [f for _, f in mine]))
                fresh[key] = n
        results = []
        for context, batch in scored:
            keys = [self._key(context, ex.id) for ex in batch]
            traces = [Trace(**self.cache[k]) for k in keys]
            calls = sum(fresh.pop(k, 0) for k in keys)  # a duplicate pair is charged once
            results.append(EvalResult([t.score for t in traces], traces, calls))
        return results

    def evaluate(self, batch: Sequence[Example], candidate: Candidate, capture_traces: bool = False) -> EvalResult:
        """Score one candidate on ``batch`` (gepa's argument order); traces are always kept
        (``capture_traces`` is accepted for the adapter interface: they cost nothing extra here)."""
        return self.evaluate_many(batch, [candidate])[0]

    def make_reflective_dataset(self, candidate: Candidate, result: EvalResult, components: Sequence[str],
                                max_output_chars: int = 2000) -> dict[str, list[dict[str, str]]]:
        """One record (Inputs, Generated Outputs, Feedback) per sample, for each component."""
        records = [reflective_record(r.inputs, out, fb, max_output_chars)
                   for r in result.traces for out, fb in zip(r.outputs, r.feedbacks)]
        return {name: list(records) for name in components}

    def state(self) -> dict[str, Any]:
        return {"calls": self.calls, "policy_step": self.policy_step, "cache": self.cache}

    def load_state(self, state: dict[str, Any]) -> None:
        self.calls, self.policy_step, self.cache = state["calls"], state["policy_step"], dict(state["cache"])
