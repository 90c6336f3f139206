"""A pod run's time forecast from the dry run's roofline times: a compiler lower bound, not a
measurement.

``forecast(job, report)`` prices the loop of ``fst_jax.jobs.train`` with the roofline seconds of
each compiled program (``report["programs"]``, from a dry run on a TPU slice):

- an RL step: the rollout (its prefill and decode: every completion ``max_new_tokens`` long) and
  the train step (none in mode ``gepa``);
- a GEPA round (modes ``fst``, ``gepa``): its metric calls (``GEPAConfig.round_budget``: the K
  carried contexts re-scored on the anchor set and the proposals' budget) priced at the
  evaluation program's seconds per completion (the same batch as an evaluation's; GEPA's own
  batches are smaller, so slower), and its proposals (the most the budget allows, one per
  ``2 x minibatch_size`` samples, at most ``max_proposals``), each one reflection request
  (``parallel_proposals`` per call) for the policy reflector;
- an evaluation: as many calls of the evaluation program (its largest) as it makes (the
  trained weights' requests: ``preflight.eval_requests``);
- a cycle: ``fast.every`` RL steps, one GEPA round and its share of evaluations; the run:
  ``steps`` RL steps, ``steps / fast.every`` rounds, ``steps / eval.every`` evaluations.

Host work (rewards, GEPA's bookkeeping, checkpoints) and the time between programs are not
counted. ``mfu``: ``6 x params x tokens`` of the train step over its roofline time at the chip's
peak.
"""

from __future__ import annotations

import math
from typing import Any

from fst_jax.roofline import model_flops
from fst_jax.tpu import parse_topology

LABEL = "compiler lower bound (roofline of each compiled program), not a measurement"


def _seconds(report: dict[str, Any], name: str) -> float:
    """Roofline seconds of request ``name`` (prefill + decode), or of program ``name``."""
    p = report["programs"]
    if name in p:
        return p[name]["roofline_seconds"]
    return p[f"{name}_prefill"]["roofline_seconds"] + p[f"{name}_decode"]["roofline_seconds"]


def forecast(job, report: dict[str, Any]) -> dict[str, Any]:
    """Seconds per RL step by phase, per GEPA round, per evaluation, per cycle and for the whole
    run of ``job``, and the train step's implied MFU (see the module doc)."""
    from fst_jax.jobs.preflight import eval_requests, generate_shapes

    slice_ = parse_topology(job.target.topology)
    shapes = {g.name: g for g in generate_shapes(job)}
    step = {"rollout": _seconds(report, "rollout"),
            "train": _seconds(report, "train_step") if job.trains_weights else 0.0}
    step["total"] = step["rollout"] + step["train"]
    out: dict[str, Any] = {"label": LABEL, "topology": slice_.name, "rl_step": step}
    evaluation = 0.0
    if job.eval.every > 0:
        calls, _ = eval_requests(job)
        ev = shapes["eval"]
        evaluation = len(calls) * _seconds(report, "eval")
        per_completion = _seconds(report, "eval") / (ev.contexts * ev.prompts_per_context * ev.samples)
    rounds, gepa_round = 0, 0.0
    if job.evolves_contexts:
        g = job.fast.gepa
        rounds = job.steps // job.fast.every
        anchor = job.problems_per_step * job.fast.every
        rescore, search = g.round_budget(anchor, g.top_k)
        calls = rescore + (search or 0)
        # The most proposals: each scoring parent and child on a minibatch, none accepted.
        proposals = (search or 0) // (2 * g.minibatch_size * g.eval.samples_per_example)
        if g.max_proposals is not None:
            proposals = min(proposals, g.max_proposals)
        reflect = (math.ceil(proposals / g.parallel_proposals) * _seconds(report, "reflection")
                   if "reflection" in shapes else 0.0)
        score = calls * per_completion if job.eval.every > 0 else float("nan")
        gepa_round = score + reflect
        out["gepa_round"] = {"metric_calls": calls, "scoring": score, "proposals": proposals,
                             "reflection": reflect, "total": gepa_round}
    evals = job.steps // job.eval.every if job.eval.every > 0 else 0
    out["evaluation"] = evaluation
    every = job.fast.every if job.evolves_contexts else 1
    out["cycle"] = every * step["total"] + gepa_round + evaluation * every / max(1, job.eval.every)
    out["run"] = {"rl_steps": job.steps * step["total"], "gepa_rounds": rounds * gepa_round,
                  "evaluations": evals * evaluation}
    out["run"]["total"] = sum(out["run"].values())
    if job.trains_weights:
        rows, tokens = report["batch_shape"]
        useful = model_flops(report["num_params"], rows * tokens) / slice_.devices
        out["train_mfu"] = useful / (step["train"] * slice_.device_flops)
    return out


def format_forecast(f: dict[str, Any]) -> str:
    """The forecast as a small table (seconds, hours for the run)."""
    s = f["rl_step"]
    lines = [f"forecast on {f['topology']}: {f['label']}",
             f"  RL step        {s['total']:10.2f} s  (rollout {s['rollout']:.2f}, train {s['train']:.2f})"]
    if "gepa_round" in f:
        g = f["gepa_round"]
        lines.append(f"  GEPA round     {g['total']:10.2f} s  ({g['metric_calls']} metric calls "
                     f"{g['scoring']:.2f}, {g['proposals']} proposals' reflection {g['reflection']:.2f})")
    lines.append(f"  evaluation     {f['evaluation']:10.2f} s")
    lines.append(f"  cycle          {f['cycle']:10.2f} s")
    r = f["run"]
    lines.append(f"  run            {r['total'] / 3600:10.2f} h  (RL {r['rl_steps'] / 3600:.2f}, GEPA "
                 f"{r['gepa_rounds'] / 3600:.2f}, eval {r['evaluations'] / 3600:.2f})")
    if "train_mfu" in f:
        lines.append(f"  train-step MFU {100 * f['train_mfu']:9.1f} %  (6 x params x tokens over the roofline time)")
    return "\n".join(lines)
