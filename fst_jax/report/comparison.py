"""A comparison's report: each (mode, seed) run folder read, one seed's report written to its
folder (the numbers, ``summary.md``/``summary.json`` and figures), and across seeds the evidence
(``fst_jax.report.evidence``). ``fst_jax.jobs.compare`` runs the modes and calls
``write_report`` with the runs' jobs.

Per seed (``report/`` for one seed, ``report/seed<k>/`` for several):

- ``reward_vs_step.png`` (running max of validation mean@k from ``eval.jsonl``),
  ``kl_vs_reward.png`` (exact KL to the base model against mean@k), ``training_reward.png``
  (running mean of the training reward from ``steps.jsonl``), ``sigmoid_fits.png``;
- the 2x2 table {base, trained weights} x {original, evolved context}, greedy pass@1 on the
  task's ``eval.num_examples`` test examples: trained = the fst run's ``hf/`` folder, evolved =
  its best kept context, base = the config's model;
- the ScaleRL sigmoid fit (A, C_mid, B) of each mode's mean@k against step, the steps each mode
  needs to reach rl's peak, the KL at matched reward, the OOD scores, and what the GEPA rounds
  did (proposals, outcomes, budget spent, minibatch scores of parents and children);
- ``summary.md`` (every number) and ``summary.json`` (the same, machine-readable);
- across seeds, from the per-problem logs (``eval_problems.jsonl``): ``report/evidence.md`` and
  ``evidence.json``, each headline quantity and each between-mode difference with a 95% paired
  bootstrap interval over seeds and problems, flagged when not pre-stated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from fst_jax.evaluation import decomposition_2x2, pass_at_1
from fst_jax.report.curves import SigmoidFit, fit_sigmoid, running_max, steps_to_reference_peak
from fst_jax.report.figures import plot_continual, plot_fits, plot_metrics, plot_training_reward
from fst_jax.runs import CONTEXT_MODES, EVAL, STEPS, WEIGHT_MODES, RunFolder, RunLogs

if TYPE_CHECKING:
    from fst_jax.jobs.compare import CompareJob
    from fst_jax.jobs.train import TrainJob

REPORT_DIR = "report"


def mean_key(runs: Mapping[str, RunLogs]) -> str:
    """The ``eval/mean@k`` key the runs logged (one k for all)."""
    keys = {k for run in runs.values() for r in run.eval for k in r
            if k.startswith("eval/mean@") and k[len("eval/mean@"):].isdigit()}
    if len(keys) != 1:
        raise ValueError(f"expected one eval/mean@k key across the runs, found {sorted(keys)} "
                         "(did every run evaluate, with the same eval.k?)")
    return keys.pop()


def kl_at_matched_reward(runs: Mapping[str, RunLogs], key: str) -> dict[str, Any]:
    """KL to the base model at the highest mean@k that every weight-training run reached after
    training began: for each such run, at its first evaluation after step 0 with mean@k >= that
    level (step 0 holds the base weights, whose KL is 0 by definition), ``eval/kl_to_base`` (KL
    under the run's evaluated context, where its mean@k is) as ``kl`` and
    ``eval/kl_to_base_original`` (under the original prompt; absent in older logs) as
    ``kl_original``."""
    curves = {m: [(r["step"], float(r[key]), float(r["eval/kl_to_base"])) for r in run.eval
                  if r["step"] > 0 and r.get(key) is not None and r.get("eval/kl_to_base") is not None]
              for m, run in runs.items() if m in WEIGHT_MODES}
    curves = {m: sorted(c) for m, c in curves.items() if c}
    if not curves:
        return {"reward": None, "kl": {}, "kl_original": {}, "step": {}}
    level = min(max(v for _, v, _ in c) for c in curves.values())
    first = {m: next(p for p in c if p[1] >= level) for m, c in curves.items()}
    original = {m: {r["step"]: r.get("eval/kl_to_base_original") for r in runs[m].eval} for m in first}
    return {"reward": level, "kl": {m: p[2] for m, p in first.items()},
            "kl_original": {m: original[m].get(p[0]) for m, p in first.items()},
            "step": {m: p[0] for m, p in first.items()}}


def continual_table(runs: Mapping[str, RunLogs], job: TrainJob, key: str) -> list[dict[str, Any]]:
    """Per schedule stage: each mode's best ``key`` over its evaluations on that stage's task
    within the stage (steps ``start`` to ``end``, the evaluation at ``end`` included), and that
    value normalised by the best any mode reached in the stage (None where no mode evaluated)."""
    table, start = [], 0
    for stage in job.stages():
        end = start + stage.steps
        best = {m: max((float(r[key]) for r in run.eval if r.get("task") == stage.task
                        and start <= r["step"] <= end and r.get(key) is not None), default=None)
                for m, run in runs.items()}
        top = max((v for v in best.values() if v is not None), default=None)
        table.append({"task": stage.task, "start": start, "end": end, "best": best,
                      "normalised": {m: (v / top if top else None) if v is not None else None
                                     for m, v in best.items()}})
        start = end
    return table


# -- the 2x2 ------------------------------------------------------------------------------
def two_by_two_table(job: TrainJob, fst_run: str | Path) -> dict[str, Any]:
    """Greedy pass@1 of {base, trained} weights x {original, evolved} context on the task's
    ``eval.num_examples`` test examples (``eval.seed``): base = ``job.model``, trained =
    ``<fst_run>/hf``, evolved = the run's best kept context, original = the task's original
    prompt. With a schedule, the task is the last stage's (where the run ended). When the run's
    final evaluation (at step ``job.steps``) logged the 2x2, it is those numbers: the same
    weights, context, examples and greedy decoding, so nothing is sampled again. Returns
    ``{"table": {"base/original": ..}, "task": name, "contexts": {...}, "examples": n,
    "source": "final evaluation" | "report"}``."""
    from flax import nnx

    from fst_jax.models.loading import load_model
    from fst_jax.models.weights import load_hf_folder
    from fst_jax.sampling import Sampler
    from fst_jax.sharding import make_mesh, shard_state
    from fst_jax.tasks import make_task, safe_reward

    folder = RunFolder(fst_run)
    hf, contexts = folder.weights, folder.contexts()
    if not contexts:
        raise FileNotFoundError(f"{folder.path} has no finished fst run (contexts.json)")
    stage = job.stages()[-1]
    task = make_task(stage.task, **stage.task_options)
    original, evolved = task.original_prompt, contexts[0]
    info = {"task": stage.task, "contexts": {"original": original, "evolved": evolved}}
    final = [r for r in folder.rows(EVAL) if r.get("step") == job.steps and "eval/2x2/base/original" in r]
    if final:
        table = {k[len("eval/2x2/"):]: float(v) for k, v in final[-1].items() if k.startswith("eval/2x2/")}
        return {"table": table, **info, "examples": job.eval.num_examples, "source": "final evaluation"}
    if not hf.is_dir():
        raise FileNotFoundError(f"{folder.path} has no exported weights (hf/) and its final evaluation "
                                f"logged no 2x2 (eval.two_by_two)")
    mesh = make_mesh(job.mesh)
    model, tokenizer = load_model(job.model, job.dtype, job.sampling.max_context_tokens, job.seed)
    sampler = Sampler(model, tokenizer, job.sampling, mesh)
    _, trained_model = load_hf_folder(hf, dtype=job.dtype)
    trained = shard_state(nnx.state(trained_model), mesh)
    examples = task.examples("test", job.eval.num_examples, seed=job.eval.seed)

    def accuracy(weights, context: str) -> float:
        texts = sampler.generate_text(weights, [(context, ex.prompt) for ex in examples], n=1,
                                      seed=job.eval.seed, temperature=0.0,
                                      max_new_tokens=job.eval.max_new_tokens)
        return pass_at_1([safe_reward(task, ex, t[0])[0] for ex, t in zip(examples, texts)])

    return {"table": decomposition_2x2(accuracy, sampler.params, trained, original, evolved),
            **info, "examples": len(examples), "source": "report"}


def format_2x2(table: Mapping[str, float]) -> str:
    """A markdown table (rows: weights, columns: context) of a ``decomposition_2x2`` result."""
    lines = ["| weights \\ context | original | evolved |", "|---|---|---|"]
    for w in ("base", "trained"):
        lines.append(f"| {w} | {table[f'{w}/original']:.4f} | {table[f'{w}/evolved']:.4f} |")
    return "\n".join(lines)


# -- the report ---------------------------------------------------------------------------
def _fit(steps: Sequence[int], values: Sequence[float]) -> dict[str, Any]:
    try:
        f: SigmoidFit = fit_sigmoid(steps, values)
    except ValueError as e:  # too few points, or a curve the form cannot take
        return {"error": str(e)}
    return dataclasses.asdict(f)


def _mode_numbers(run: RunLogs, key: str) -> dict[str, Any]:
    k_pass = "eval/pass@1"
    last = run.eval[-1] if run.eval else {}
    steps, vals = run.curve(key)
    ood = {k: v for k, v in last.items() if k.startswith("eval/ood/")}
    tail = run.steps[-6:]
    return {
        "steps_done": run.steps[-1]["step"] + 1 if run.steps else 0,
        "finished": run.result is not None and run.result.get("steps_done") == run.result.get("steps"),
        "evaluations": len(steps),
        "final_mean": vals[-1] if vals else None,
        "max_mean": running_max(vals)[-1] if vals else None,
        "final_pass@1": last.get(k_pass),
        "max_pass@1": max((r[k_pass] for r in run.eval if r.get(k_pass) is not None), default=None),
        "final_kl_to_base": last.get("eval/kl_to_base"),
        "train_reward_last_steps": float(np.mean([r["reward_mean"] for r in tail])) if tail else None,
        "ood": ood,
        "sigmoid": _fit(steps, vals),
    }


def fast_channel_numbers(run: RunLogs) -> dict[str, Any] | None:
    """What a mode's GEPA rounds did (None without rounds): totals of the rounds' ledgers
    (``gepa.jsonl``), the metric calls each round spent, and over the proposals whose child was
    scored on its minibatch (``proposal_log``), the mean minibatch score of parents and of
    children: a child that scores no better than its parent is rejected."""
    if not run.gepa:
        return None
    totals = {k: sum(r[k] for r in run.gepa) for k in ("proposals", "accepted", "rejected", "skipped")}
    reasons = sum((Counter(r.get("skip_reasons", {})) for r in run.gepa), Counter())
    scored = [p for r in run.gepa for p in r.get("proposal_log", []) if p.get("child_scores") is not None]
    return {"rounds": len(run.gepa), **totals, "skip_reasons": dict(reasons),
            "metric_calls_per_round": [r["metric_calls"] for r in run.gepa],
            "best_anchor_score_per_round": [r["best_anchor_score"] for r in run.gepa],
            "scored_children": len(scored),
            "minibatch_mean_parent": float(np.mean([np.mean(p["parent_scores"]) for p in scored])) if scored else None,
            "minibatch_mean_child": float(np.mean([np.mean(p["child_scores"]) for p in scored])) if scored else None}


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _markdown(summary: dict[str, Any]) -> str:
    key, modes = summary["reward_key"], summary["modes"]
    lines = [f"# Comparison: {summary['task']} on {summary['model']}", "",
             f"Modes {', '.join(modes)}; {summary['steps']} RL steps, {summary['problems_per_step']} "
             f"problems x {summary['samples_per_problem']} samples per step; validation {key} on "
             f"{summary['eval_examples']} test examples every {summary['eval_every']} steps.", "",
             "## Per mode", "",
             "| mode | steps done | final " + key + " | max " + key + " | final pass@1 | max pass@1 "
             "| final KL to base | train reward (last 6 steps) |", "|---|---|---|---|---|---|---|---|"]
    for m, n in summary["per_mode"].items():
        lines.append(f"| {m} | {n['steps_done']}{'' if n['finished'] else ' (unfinished)'} | "
                     f"{_num(n['final_mean'])} | {_num(n['max_mean'])} | {_num(n['final_pass@1'])} | "
                     f"{_num(n['max_pass@1'])} | {_num(n['final_kl_to_base'], 6)} | "
                     f"{_num(n['train_reward_last_steps'])} |")
    lines += ["", f"## Sigmoid fits of {key} against step", "",
              "R - R0 = (A - R0) / (1 + (C_mid / C)^B), least squares (`fst_jax.report.curves.fit_sigmoid`). "
              "A parameter on a bound of the search is not determined by the data: B at its top means a "
              "step between two evaluations, C_mid at its top or A at 1 an extrapolation.", "",
              "| mode | A | C_mid | B | R0 | rmse | points | on a bound |", "|---|---|---|---|---|---|---|---|"]
    for m, n in summary["per_mode"].items():
        f = n["sigmoid"]
        if "A" in f:
            lines.append(f"| {m} | {_num(f['A'])} | {_num(f['C_mid'], 1)} | {_num(f['B'], 3)} | "
                         f"{_num(f['R0'])} | {_num(f['rmse'])} | {f['points']} | "
                         f"{', '.join(f['at_bounds']) or 'none'} |")
        else:
            lines.append(f"| {m} | no fit: {f['error']} | | | | | | |")
    peak = summary["steps_to_rl_peak"]
    lines += ["", "## Steps to reach rl's peak " + key, ""]
    if peak is None:
        lines.append("No rl run with evaluations.")
    else:
        lines.append(f"rl's peak (running max): {_num(peak['peak'])}.")
        lines += ["", "| mode | first step at or above it |", "|---|---|"]
        lines += [f"| {m} | {_num(s) if s is not None else 'never'} |" for m, s in peak["steps"].items()]
    kl = summary["kl_at_matched_reward"]
    lines += ["", "## KL to the base model at matched reward", ""]
    if kl["reward"] is None:
        lines.append("No weight-training run logged eval/kl_to_base after step 0.")
    else:
        lines.append(f"Highest {key} that every weight-training run reached after step 0 (the base "
                     f"weights): {_num(kl['reward'])}. Exact KL(pi_theta \\|\\| pi_base) per token on "
                     f"{summary['kl_samples']} samples per problem, under the run's evaluated context (where "
                     f"its {key} is) and under the original prompt.")
        lines += ["", "| mode | step | KL, evaluated context | KL, original prompt |", "|---|---|---|---|"]
        lines += [f"| {m} | {kl['step'][m]} | {_num(v, 6)} | {_num(kl['kl_original'][m], 6)} |"
                  for m, v in kl["kl"].items()]
    lines += ["", "## 2x2: weights x context (greedy pass@1)", ""]
    tbt = summary["two_by_two"]
    if "table" in tbt:
        lines += [f"On {tbt['examples']} test examples of {tbt['task']}; trained = the fst run's weights, evolved = "
                  f"its best kept context (computed by the {tbt['source']}).", "", format_2x2(tbt["table"]), "",
                  "Evolved context:", "", "```", tbt["contexts"]["evolved"], "```"]
    else:
        lines.append(f"Not computed: {tbt['skipped']}")
    if summary["continual"]:
        modes_c = list(summary["continual"][0]["best"])
        lines += ["", f"## Continual learning: best {key} per stage, normalised by the best mode", "",
                  "| stage | steps | " + " | ".join(modes_c) + " |", "|---" * (len(modes_c) + 2) + "|"]
        for row in summary["continual"]:
            lines.append(f"| {row['task']} | {row['start']}-{row['end']} | " + " | ".join(
                f"{_num(row['normalised'][m], 3)} ({_num(row['best'][m], 3)})" for m in modes_c) + " |")
        means = {m: [r["normalised"][m] for r in summary["continual"] if r["normalised"][m] is not None]
                 for m in modes_c}
        lines.append("| mean over stages | | " + " | ".join(
            _num(float(np.mean(v)), 3) if v else "-" for v in means.values()) + " |")
    fast = {m: f for m, f in summary["fast_channel"].items() if f}
    if fast:
        lines += ["", "## Fast channel: GEPA rounds", "",
                  "Minibatch means are over the proposals whose child was scored on its parent's minibatch.", "",
                  "| mode | rounds | proposals | accepted | rejected | skipped (reasons) | metric calls per round "
                  "| best anchor score per round | minibatch mean, parents / children |", "|---" * 9 + "|"]
        for m, f in fast.items():
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(f["skip_reasons"].items()))
            lines.append(f"| {m} | {f['rounds']} | {f['proposals']} | {f['accepted']} | {f['rejected']} | "
                         f"{f['skipped']}{f' ({reasons})' if reasons else ''} | "
                         f"{', '.join(map(str, f['metric_calls_per_round']))} | "
                         f"{', '.join(_num(v, 3) for v in f['best_anchor_score_per_round'])} | "
                         f"{_num(f['minibatch_mean_parent'], 3)} / {_num(f['minibatch_mean_child'], 3)} |")
    ood = {m: n["ood"] for m, n in summary["per_mode"].items() if n["ood"]}
    lines += ["", "## Out-of-distribution tasks (original prompt, last evaluation)", ""]
    if ood:
        keys = sorted({k for v in ood.values() for k in v})
        lines += ["| mode | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(_num(v.get(k)) for k in keys) + " |" for m, v in ood.items()]
    else:
        lines.append("None configured (eval.ood_tasks).")
    fst = summary["contexts_kept"].get("fst") or summary["contexts_kept"].get("gepa")
    if fst:
        lines += ["", "## Contexts kept (best first)", ""]
        for mode, ctxs in summary["contexts_kept"].items():
            for i, c in enumerate(ctxs):
                lines += [f"{mode} #{i}:", "", "```", c, "```", ""]
    lines += ["", "## Figures", ""] + [f"![{p}]({p})" for p in summary["figures"]]
    return "\n".join(lines) + "\n"


def write_report(job: CompareJob, runs: Mapping[int, Mapping[str, TrainJob]], *,
                 two_by_two: bool = True) -> dict[str, Any]:
    """Read the run folder of each ``runs[seed][mode]`` job and write ``<output_dir>/report/``
    (see the module doc); returns the summary. One seed: the per-run summary (also
    ``summary.json``) with ``"evidence"`` added; several: ``{"seeds", "per_seed": {seed: per-run
    summary}, "evidence"}``. Runs without a ``steps.jsonl`` are left out; the 2x2 is skipped (with the
    reason in the summary) when the fst run has not finished or ``two_by_two`` is false.
    ``evidence`` is None until some run has per-problem logs."""
    from fst_jax.report.evidence import write_evidence

    out = Path(job.output_dir) / REPORT_DIR
    per_seed, runs_by_seed = {}, {}
    for seed, jobs in runs.items():
        folders = {m: RunFolder(sub.output_dir) for m, sub in jobs.items()}
        read = {m: f.read(m) for m, f in folders.items() if f.stream(STEPS).exists()}
        if not read:
            continue
        runs_by_seed[seed] = read
        seed_out = out if len(job.seeds) == 1 else out / f"seed{seed}"
        per_seed[seed] = _run_report(jobs.get("fst") or next(iter(jobs.values())), read, seed_out,
                                     two_by_two)
    if not runs_by_seed:
        modes = sorted({m for jobs in runs.values() for m in jobs})
        raise FileNotFoundError(f"no run folders under {job.output_dir} for modes {modes}")
    evidence = write_evidence(job, runs_by_seed, out)
    note = ("Across seeds and problems, every quantity with its interval: [evidence.md](evidence.md)."
            if evidence else "No per-problem logs (eval_problems.jsonl) yet: no intervals.")
    if len(job.seeds) == 1:
        summary = {**next(iter(per_seed.values())), "evidence": evidence}
        with open(out / "summary.md", "a") as f:
            f.write(f"\n{note}\n")
    else:
        summary = {"seeds": list(per_seed), "per_seed": per_seed, "evidence": evidence}
        (out / "summary.md").write_text(f"# Comparison over seeds {list(per_seed)}\n\n{note}\n\n" + "".join(
            f"- seed {k}: [seed{k}/summary.md](seed{k}/summary.md)\n" for k in per_seed))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _run_report(job: TrainJob, runs: Mapping[str, RunLogs], out: Path, two_by_two: bool
                ) -> dict[str, Any]:
    """The report of one seed's runs (``job``: that seed's fst run, whose 2x2 it computes) in
    ``out``: figures, ``summary.md`` and ``summary.json``; returns the summary."""
    key = mean_key(runs)
    out.mkdir(parents=True, exist_ok=True)
    per_mode = {m: _mode_numbers(run, key) for m, run in runs.items()}
    curves = {m: run.curve(key) for m, run in runs.items() if run.curve(key)[0]}
    peak = None
    if "rl" in curves:
        peak = {"peak": max(curves["rl"][1]), "steps": steps_to_reference_peak(curves, "rl")}
    if not two_by_two:
        tbt: dict[str, Any] = {"skipped": "turned off"}
    elif "fst" not in runs or not per_mode["fst"]["finished"]:
        tbt = {"skipped": "no finished fst run"}
    else:
        tbt = two_by_two_table(job, runs["fst"].folder.path)
    rows = [r for run in runs.values() for r in run.eval]
    figures = [p.name for p in plot_metrics(rows, out, key)]
    figures.append(plot_training_reward(runs, out / "training_reward.png").name)
    figures.append(plot_fits(runs, {m: n["sigmoid"] for m, n in per_mode.items()}, key,
                              out / "sigmoid_fits.png").name)
    continual = continual_table(runs, job, key) if len(job.stages()) > 1 else None
    if continual:
        figures.append(plot_continual(continual, out / "continual.png").name)
    summary = {
        "task": " -> ".join(st.task for st in job.stages()), "model": job.model, "steps": job.steps, "modes": list(runs),
        "problems_per_step": job.problems_per_step, "samples_per_problem": job.samples_per_problem,
        "eval_examples": job.eval.num_examples, "eval_every": job.eval.every, "reward_key": key,
        "kl_samples": job.eval.kl_samples,
        "per_mode": per_mode, "steps_to_rl_peak": peak,
        "kl_at_matched_reward": kl_at_matched_reward(runs, key), "two_by_two": tbt,
        "continual": continual,
        "fast_channel": {m: fast_channel_numbers(run) for m, run in runs.items()},
        "contexts_kept": {m: ctx for m, run in runs.items()
                          if m in CONTEXT_MODES and (ctx := run.folder.contexts())},
        "figures": figures,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(_markdown(summary))
    return summary
