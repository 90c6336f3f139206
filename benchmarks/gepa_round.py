"""A GEPA round at equal metric-call budget: one proposal at a time vs parallel proposals.

Model: SmolLM2-135M-Instruct (bundled), fp32, on the ``arithmetic`` task; the policy itself
reflects (``backend="policy"``, at most ``--reflection-tokens`` new tokens); scoring is greedy
with at most ``--max-new-tokens`` new tokens. Both sides run ``run_gepa_round`` on the same
sampler, anchor set and seed context until ``--budget`` metric calls are spent; the only
difference is ``GEPAConfig.parallel_proposals`` (1 vs ``--parallel``). A step stops at the first
check past the budget, so the parallel side may spend a few more calls: the JSON gives the raw
speed-up and the speed-up per metric call.

Each side first runs a warm-up round of ``--warmup-budget`` metric calls (it compiles the
sampler's programs for that side's batch shapes: "cold_s"), then ``--repeats`` timed rounds,
the sides alternating (sequential, parallel, sequential, ...) so both see the same load on a
shared machine; "warm_s" is their median and "compiles_in_timed" counts programs still
compiled during them; "warm_cpu_s" is the process CPU time (less sensitive to other
processes than wall time). Repeated timed rounds of a side must give the same history (checked).

The FST cycle estimate: the fast phase spends 960 metric calls per cycle, the slow phase
6 x 32 x 8 RL rollouts (the paper's ratio). RL rollout time per rollout is measured on the same
sampler in the same run: 8 problems x 8 samples, 4 contexts (the round's top-K) x 2 samples
each, temperature 1, the same max new tokens (warm). Reference log-probs and the update are
not included: ``fast_share`` is the fast phase's share of (fast + RL rollouts).

    nice -n 10 python benchmarks/gepa_round.py [--budget 48] [--parallel 4] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fst_jax.fast import GEPAConfig, ScoringConfig, ReflectionConfig, run_gepa_round  # noqa: E402
from fst_jax.sampling import Sampler, SamplingConfig  # noqa: E402
from fst_jax.tasks import make_task  # noqa: E402

PAPER_METRIC_CALLS = 960
PAPER_RL_ROLLOUTS = 6 * 32 * 8
SEED_CONTEXT = "You are a helpful assistant."


class CountingSampler:
    """The sampler with a count of ``generate_text`` calls and rows (a device batch each)."""

    def __init__(self, sampler: Sampler):
        self.sampler, self.tokenizer = sampler, sampler.tokenizer
        self.calls = self.rows = 0

    def generate_text(self, params, pairs, n=1, **kw):
        self.calls += 1
        self.rows += len(pairs) * n
        return self.sampler.generate_text(params, pairs, n=n, **kw)


def gepa_round(sampler: Sampler, task, anchor, args, parallel: int, budget: int) -> dict:
    counting = CountingSampler(sampler)
    compiled = sum(sampler.trace_counts.values())
    config = GEPAConfig(max_metric_calls=budget, parallel_proposals=parallel, seed=args.seed,
                        eval=ScoringConfig(temperature=0.0),
                        reflection=ReflectionConfig(backend="policy", max_tokens=args.reflection_tokens))
    t, cpu = time.perf_counter(), time.process_time()
    result = run_gepa_round(counting, sampler.params, task, anchor, [{"context": SEED_CONTEXT}], config)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    b = result.budget
    history = [{k: v for k, v in r.items() if k != "seconds"} for r in result.optimizer.history]
    print(f"P={parallel} budget={budget}: {seconds:.1f}s wall, {cpu:.1f}s CPU, {b.metric_calls} metric calls, "
          f"{b.proposals} proposals, {counting.calls} generate calls", file=sys.stderr, flush=True)
    return {"seconds": seconds, "cpu_s": cpu, "metric_calls": b.metric_calls, "proposals": b.proposals,
            "accepted": b.accepted, "rejected": b.rejected, "skipped": b.skipped, "reflection_calls": b.reflection_calls,
            "generate_calls": counting.calls, "generated_rows": counting.rows,
            "compiles": sum(sampler.trace_counts.values()) - compiled,
            "best_anchor_score": max(result.optimizer.population.aggregate()),
            "contexts": [c["context"] for c in result.contexts], "history": history}


def rl_rollout_seconds(sampler: Sampler, task, contexts: list[str], max_new_tokens: int, repeats: int) -> dict:
    """Seconds per RL rollout: 8 problems x 8 samples, contexts mixed within each group
    (8 / len(contexts) samples per context), temperature 1; warm median of ``repeats``."""
    problems = task.examples("train", 8, seed=123)
    contexts = (contexts * 4)[:4]
    pairs = [(c, p.prompt) for p in problems for c in contexts]
    n = 8 // len(contexts)
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        sampler.generate_text(sampler.params, pairs, n=n, seed=len(times), temperature=1.0,
                              max_new_tokens=max_new_tokens)
        times.append(time.perf_counter() - t)
    rollouts = len(pairs) * n
    return {"rollouts": rollouts, "cold_s": times[0], "warm_s": statistics.median(times[1:]),
            "s_per_rollout": statistics.median(times[1:]) / rollouts}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=int, default=48, help="metric calls per round")
    parser.add_argument("--parallel", type=int, default=4, help="parallel proposals P")
    parser.add_argument("--anchor", type=int, default=12, help="anchor (Pareto) examples")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="scoring and RL rollouts")
    parser.add_argument("--reflection-tokens", type=int, default=128)
    parser.add_argument("--warmup-budget", type=int, default=16, help="metric calls of the warm-up rounds")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds per side")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.repeats < 1 or args.parallel < 2:
        parser.error("--repeats must be >= 1 and --parallel >= 2")

    sampler = Sampler.load("smollm2-135m-instruct", SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=0.0, prompt_buckets=(128, 256, 512, 1024, 2048)))
    task = make_task("arithmetic")
    anchor = task.examples("train", args.anchor, seed=args.seed)
    sides_p = [1, args.parallel]
    cold = {p: gepa_round(sampler, task, anchor, args, p, args.warmup_budget)["seconds"] for p in sides_p}
    runs: dict[int, list[dict]] = {p: [] for p in sides_p}
    for _ in range(args.repeats):
        for p in sides_p:
            runs[p].append(gepa_round(sampler, task, anchor, args, p, args.budget))
    sides = {}
    for p, rs in runs.items():
        if any(r["history"] != rs[0]["history"] for r in rs[1:]):
            raise RuntimeError(f"P={p}: repeated rounds diverged; the round is not deterministic")
        side = {k: v for k, v in rs[0].items() if k not in ("seconds", "cpu_s", "history", "contexts", "compiles")}
        side.update(cold_s=round(cold[p], 2), warm_s=round(statistics.median(r["seconds"] for r in rs), 2),
                    warm_cpu_s=round(statistics.median(r["cpu_s"] for r in rs), 2),
                    compiles_in_timed=sum(r["compiles"] for r in rs))
        side["s_per_metric_call"] = round(side["warm_s"] / side["metric_calls"], 4)
        sides[p] = side
    seq, par = sides[1], sides[args.parallel]
    rl = rl_rollout_seconds(sampler, task, runs[args.parallel][0]["contexts"], args.max_new_tokens, args.repeats)
    cycle = {}
    for name, side in (("sequential", seq), ("parallel", par)):
        fast = side["s_per_metric_call"] * PAPER_METRIC_CALLS
        slow = rl["s_per_rollout"] * PAPER_RL_ROLLOUTS
        cycle[name] = {"fast_s": round(fast, 1), "rl_rollouts_s": round(slow, 1),
                       "fast_share": round(fast / (fast + slow), 3)}
    print(json.dumps({
        "config": (f"GEPA round, SmolLM2-135M fp32, arithmetic, anchor {args.anchor}, budget {args.budget} metric "
                   f"calls, greedy scoring <= {args.max_new_tokens} new tokens, policy reflection <= "
                   f"{args.reflection_tokens} tokens"),
        "sequential": seq, f"parallel_p{args.parallel}": par,
        "speedup": round(seq["warm_s"] / par["warm_s"], 2),
        "speedup_per_metric_call": round(seq["s_per_metric_call"] / par["s_per_metric_call"], 2),
        "cpu_time_ratio": round(seq["warm_cpu_s"] / par["warm_cpu_s"], 2),
        "rl_rollouts": {k: round(v, 4) for k, v in rl.items()},
        "fst_cycle_at_paper_ratio": {"metric_calls": PAPER_METRIC_CALLS, "rl_rollouts": PAPER_RL_ROLLOUTS, **cycle},
        "goal_speedup": 3.0,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
    }))


if __name__ == "__main__":
    main()
