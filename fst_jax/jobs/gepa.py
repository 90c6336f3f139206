"""The ``gepa`` job: GEPA alone (frozen weights) on a task, with a report and a plot.

Scores a seed context on an anchor set, runs one GEPA round (the policy itself reflects by
default), then measures the seed and the best context on held-out examples. Writes to
``output_dir``: ``state.json`` (resumable optimizer state, saved after every proposal),
``result.json`` (budget, accuracies, timings, top contexts) and ``progress.png`` (best anchor
score against metric calls, every proposal marked by its outcome).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from fst_jax.config import require, to_dict
from fst_jax.fast.evaluator import ScoringConfig
from fst_jax.fast.optimizer import GEPAConfig, run_gepa_round
from fst_jax.fast.reflection import ReflectionConfig
from fst_jax.report.figures import plot_gepa_progress
from fst_jax.sampling import Sampler, SamplingConfig
from fst_jax.tasks import make_task, safe_reward

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GEPAJob:
    """GEPA on frozen weights. ``anchor_size`` examples form the Pareto/feedback set,
    ``test_size`` held-out examples measure the contexts before and after (greedy).
    ``timing_examples`` are also scored one prompt at a time to compare with batched scoring."""

    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    task: str = "arithmetic"
    seed_context: str = "You are a helpful assistant."
    anchor_size: int = 16
    test_size: int = 32
    data_seed: int = 0
    timing_examples: int = 4
    output_dir: str = "runs/gepa"
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=96, temperature=0.0,
                                              prompt_buckets=(128, 256, 512, 1024, 2048))
    gepa: GEPAConfig = GEPAConfig(max_metric_calls=160, eval=ScoringConfig(temperature=0.0),
                                  reflection=ReflectionConfig(max_tokens=256))

    def __post_init__(self):
        require(self.anchor_size >= self.gepa.minibatch_size, "anchor_size must be >= minibatch_size")
        require(self.test_size >= 1 and self.timing_examples >= 1, "test_size and timing_examples must be >= 1")
        self.gepa.require_affordable(anchor_size=self.anchor_size, carried=1)


def accuracy(sampler: Sampler, task, examples, context: str) -> float:
    """Mean reward of greedy completions of ``examples`` under ``context`` (one device batch)."""
    texts = sampler.generate_text(sampler.params, [(context, e.prompt) for e in examples], temperature=0.0)
    return sum(safe_reward(task, e, t[0])[0] for e, t in zip(examples, texts)) / len(examples)


def time_metric_calls(sampler: Sampler, examples, context: str) -> dict[str, float]:
    """Seconds per metric call scored as one device batch vs one prompt at a time (both
    measured after their programs are compiled)."""
    pairs = [(context, e.prompt) for e in examples]
    sampler.generate_text(sampler.params, pairs, temperature=0.0)
    sampler.generate_text(sampler.params, pairs[:1], temperature=0.0)
    t = time.perf_counter()
    sampler.generate_text(sampler.params, pairs, temperature=0.0)
    batched = (time.perf_counter() - t) / len(pairs)
    t = time.perf_counter()
    for pair in pairs:
        sampler.generate_text(sampler.params, [pair], temperature=0.0)
    single = (time.perf_counter() - t) / len(pairs)
    return {"batched_s_per_call": round(batched, 3), "one_at_a_time_s_per_call": round(single, 3),
            "speedup": round(single / batched, 2), "batch": len(pairs)}


def run_gepa_job(job: GEPAJob) -> dict[str, Any]:
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sampler = Sampler.load(job.model, job.sampling, job.dtype)
    task = make_task(job.task)
    anchor = task.examples("train", job.anchor_size, seed=job.data_seed)
    test = task.examples("test", job.test_size, seed=job.data_seed)
    log.info("timing metric calls (batched vs one at a time)")
    timing = time_metric_calls(sampler, anchor[:job.timing_examples], job.seed_context)
    test_before = accuracy(sampler, task, test, job.seed_context)
    log.info("seed context: test accuracy %.3f; starting GEPA round", test_before)
    t_round = time.perf_counter()
    result = run_gepa_round(sampler, sampler.params, task, anchor, seeds=[{"context": job.seed_context}],
                            config=job.gepa, state_path=out / "state.json")
    round_s = time.perf_counter() - t_round
    pop = result.optimizer.population
    aggregate = pop.aggregate()
    best = result.contexts[0]["context"]
    test_after = accuracy(sampler, task, test, best)
    history = result.optimizer.history
    record = {
        "job": to_dict(job),
        "budget": result.budget.to_dict(),
        "stop_reason": result.stop_reason,
        "anchor_score_seed": aggregate[0],
        "anchor_score_best": max(aggregate),
        "test_accuracy_seed": test_before,
        "test_accuracy_best": test_after,
        "round_wall_s": round(round_s, 1),
        "total_wall_s": round(time.perf_counter() - t0, 1),
        "metric_call_timing": timing,
        "top_contexts": [{"context": m.components["context"], "anchor_score": aggregate[m.id],
                          "origin": m.origin, "parents": m.parents} for m in result.members],
        "outcomes": [h["outcome"] for h in history],
    }
    (out / "result.json").write_text(json.dumps(record, indent=2))
    plot_gepa_progress(history, aggregate[0], out / "progress.png")
    return record
