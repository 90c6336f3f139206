"""Side-by-side runner: rl, gepa and fst from one ``CompareJob`` config (a ``TrainJob`` plus
``seeds`` and the pre-stated comparisons), then one report.

``run_compare(job)`` runs every mode at every seed (seed by seed, modes in turn) on the same
data and seeds (``mode_job``: the config with ``mode=<m>``, the seed applied by ``seeded``,
``export_hf=true``, in ``<output_dir>/<m>`` for one seed, ``<output_dir>/<m>/seed<k>`` for
several), each resumable: a finished run is skipped, an unfinished one continues from its
checkpoints, and a run that stops early (SIGTERM, ``max_steps_this_run``) ends the sequence.
``write_report(job)`` then reads the run folders and writes ``<output_dir>/report/`` (with
several seeds, this per-run report goes to ``report/seed<k>/`` for each seed):

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
  bootstrap interval over seeds and problems, flagged when not pre-stated
  (``fst_jax.report.evidence``), and its figures.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fst_jax.config import require
from fst_jax.evaluation import (SigmoidFit, decomposition_2x2, fit_sigmoid, format_2x2, pass_at_1,
                                plot_metrics, running_max, steps_to_reference_peak)
from fst_jax.jobs.train import MODES, TrainJob, run_train_job
from fst_jax.metrics import read_jsonl
from fst_jax.plots import running_mean

log = logging.getLogger(__name__)

REPORT_DIR = "report"


@dataclasses.dataclass(frozen=True)
class CompareJob(TrainJob):
    """A comparison: the ``TrainJob`` every mode runs, at each of ``seeds`` (``seeded``: the seed
    moves the training data, sampling draws and GEPA seeds; the validation problems stay).
    ``primary_metric`` and ``comparisons`` are stated before the run (quantity names, see
    ``fst_jax.report.evidence.check_quantity``: e.g. ``"fst-rl: best mean@4"``); the report
    flags every quantity it gives that is not among them."""

    seeds: tuple[int, ...] = (0,)
    primary_metric: str | None = None
    comparisons: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        from fst_jax.report.evidence import check_quantity

        require(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds)
                and min(self.seeds) >= 0, f"seeds must be distinct and >= 0, got {list(self.seeds)}")
        for name in ((self.primary_metric,) if self.primary_metric else ()) + self.comparisons:
            check_quantity(name, self.eval.k)

    def train_job(self) -> TrainJob:
        """The ``TrainJob`` fields alone."""
        return TrainJob(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainJob)})


def seeded(job: TrainJob, seed: int) -> TrainJob:
    """``job`` at comparison seed ``seed``: ``seed`` added to ``job.seed`` (sampling draws),
    ``data.seed`` (the train pool), ``data.shuffle_seed`` (its order) and ``fast.gepa.seed``;
    ``eval`` (the validation problems and their draws) unchanged. Seed 0 is ``job`` itself."""
    data = dataclasses.replace(job.data, seed=job.data.seed + seed,
                               shuffle_seed=job.data.shuffle_seed + seed)
    gepa = dataclasses.replace(job.fast.gepa, seed=job.fast.gepa.seed + seed)
    return dataclasses.replace(job, seed=job.seed + seed, data=data,
                               fast=dataclasses.replace(job.fast, gepa=gepa))


def mode_job(job: CompareJob, mode: str, seed: int | None = None) -> TrainJob:
    """The run of one mode at one of ``job.seeds`` (default the first): ``seeded``, in its own
    folder ``<output_dir>/<mode>`` (one seed) or ``<output_dir>/<mode>/seed<k>`` (several; an
    absolute ``checkpoint.directory`` gets the same suffix) and ``export_hf`` on (the 2x2 reads
    the fst run's weights)."""
    require(mode in MODES, f"mode {mode!r} is not one of {MODES}")
    seed = job.seeds[0] if seed is None else seed
    require(seed in job.seeds, f"seed {seed} is not one of the comparison's seeds {list(job.seeds)}")
    sub = Path(mode) if len(job.seeds) == 1 else Path(mode) / f"seed{seed}"
    ckpt = job.checkpoint
    if Path(ckpt.directory).is_absolute():
        ckpt = dataclasses.replace(ckpt, directory=str(Path(ckpt.directory) / sub))
    return dataclasses.replace(seeded(job.train_job(), seed), mode=mode,
                               output_dir=str(Path(job.output_dir) / sub), export_hf=True,
                               checkpoint=ckpt)


def finished(job: TrainJob) -> bool:
    result = Path(job.output_dir) / "result.json"
    if not result.exists():
        return False
    done = json.loads(result.read_text()).get("steps_done") == job.steps
    return done and (not job.trains_weights or (Path(job.output_dir) / "hf").is_dir())


def run_compare(job: CompareJob, modes: Sequence[str] = MODES, *,
                reflection_fn: Callable[[str], str] | None = None,
                max_steps_this_run: int | None = None, two_by_two: bool = True
                ) -> dict[str, Any]:
    """Run (or resume) ``modes`` at every seed (seed by seed, modes in order), then
    ``write_report``; returns the report summary. ``max_steps_this_run`` bounds each run's steps
    in this invocation (time-sliced runs)."""
    require(job.eval.every > 0, "eval.every must be > 0: the comparison reads each run's eval.jsonl")
    require(len(modes) > 0 and len(set(modes)) == len(modes) and set(modes) <= set(MODES),
            f"modes must be distinct names from {MODES}, got {list(modes)}")
    for seed, mode in ((s, m) for s in job.seeds for m in modes):
        sub = mode_job(job, mode, seed)
        if finished(sub):
            log.info("compare: %s seed %d already finished (%s)", mode, seed, sub.output_dir)
            continue
        log.info("compare: running %s seed %d in %s", mode, seed, sub.output_dir)
        summary = run_train_job(sub, reflection_fn=reflection_fn,
                                max_steps_this_run=max_steps_this_run)
        if summary["steps_done"] < sub.steps:
            log.warning("compare: %s seed %d stopped at step %d of %d; rerun the same command to "
                        "continue", mode, seed, summary["steps_done"], sub.steps)
            break
    return write_report(job, modes, two_by_two=two_by_two)


# -- reading runs -------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """One mode's run folder, as read: ``steps``/``eval``/``gepa`` JSONL rows, ``result.json``
    (None while unfinished) and the kept contexts (best first)."""

    mode: str
    folder: Path
    steps: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    gepa: list[dict[str, Any]]
    result: dict[str, Any] | None
    contexts: list[str]

    @classmethod
    def read(cls, folder: str | Path, mode: str) -> "Run":
        folder = Path(folder)
        result = folder / "result.json"
        ctx_file = folder / "contexts.json"
        contexts = []
        if ctx_file.exists():
            for m in json.loads(ctx_file.read_text()):
                contexts.append(m["components"]["context"] if "components" in m else m["context"])
        return cls(mode, folder, read_jsonl(folder / "steps.jsonl"), read_jsonl(folder / "eval.jsonl"),
                   read_jsonl(folder / "gepa.jsonl"),
                   json.loads(result.read_text()) if result.exists() else None, contexts)

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key`` over the evaluations that logged it."""
        pts = sorted((r["step"], float(r[key])) for r in self.eval if r.get(key) is not None)
        return [s for s, _ in pts], [v for _, v in pts]


def mean_key(runs: Mapping[str, Run]) -> str:
    """The ``eval/mean@k`` key the runs logged (one k for all)."""
    keys = {k for run in runs.values() for r in run.eval for k in r
            if k.startswith("eval/mean@") and k[len("eval/mean@"):].isdigit()}
    if len(keys) != 1:
        raise ValueError(f"expected one eval/mean@k key across the runs, found {sorted(keys)} "
                         "(did every run evaluate, with the same eval.k?)")
    return keys.pop()


def kl_at_matched_reward(runs: Mapping[str, Run], key: str) -> dict[str, Any]:
    """KL to the base model at the highest mean@k that every weight-training run reached after
    training began: for each such run, at its first evaluation after step 0 with mean@k >= that
    level (step 0 holds the base weights, whose KL is 0 by definition), ``eval/kl_to_base`` (KL
    under the run's evaluated context, where its mean@k is) as ``kl`` and
    ``eval/kl_to_base_original`` (under the original prompt; absent in older logs) as
    ``kl_original``."""
    curves = {m: [(r["step"], float(r[key]), float(r["eval/kl_to_base"])) for r in run.eval
                  if r["step"] > 0 and r.get(key) is not None and r.get("eval/kl_to_base") is not None]
              for m, run in runs.items() if m in ("rl", "fst")}
    curves = {m: sorted(c) for m, c in curves.items() if c}
    if not curves:
        return {"reward": None, "kl": {}, "kl_original": {}, "step": {}}
    level = min(max(v for _, v, _ in c) for c in curves.values())
    first = {m: next(p for p in c if p[1] >= level) for m, c in curves.items()}
    original = {m: {r["step"]: r.get("eval/kl_to_base_original") for r in runs[m].eval} for m in first}
    return {"reward": level, "kl": {m: p[2] for m, p in first.items()},
            "kl_original": {m: original[m].get(p[0]) for m, p in first.items()},
            "step": {m: p[0] for m, p in first.items()}}


def continual_table(runs: Mapping[str, Run], job: TrainJob, key: str) -> list[dict[str, Any]]:
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


def _plot_continual(table: list[dict[str, Any]], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    modes = list(table[0]["normalised"])
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        vals = [row["normalised"][mode] or 0.0 for row in table]
        ax.bar(np.arange(len(table)) + i * width, vals, width, label=mode)
    ax.set_xticks(np.arange(len(table)) + width * (len(modes) - 1) / 2,
                  [f"{row['task']}\n{row['start']}-{row['end']}" for row in table], fontsize=7)
    ax.set(ylabel="best accuracy in stage / best of any mode", title="Continual learning, per stage")
    ax.legend()
    fig.savefig(path, dpi=120)
    return path


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

    run = Run.read(fst_run, "fst")
    hf = run.folder / "hf"
    if not hf.is_dir() or not run.contexts:
        raise FileNotFoundError(f"{run.folder} has no finished fst run (hf/ and contexts.json)")
    stage = job.stages()[-1]
    task = make_task(stage.task, **stage.task_options)
    original, evolved = task.original_prompt, run.contexts[0]
    info = {"task": stage.task, "contexts": {"original": original, "evolved": evolved}}
    final = [r for r in run.eval if r.get("step") == job.steps and "eval/2x2/base/original" in r]
    if final:
        table = {k[len("eval/2x2/"):]: float(v) for k, v in final[-1].items() if k.startswith("eval/2x2/")}
        return {"table": table, **info, "examples": job.eval.num_examples, "source": "final evaluation"}
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


# -- the report ---------------------------------------------------------------------------
def _fit(steps: Sequence[int], values: Sequence[float]) -> dict[str, Any]:
    try:
        f: SigmoidFit = fit_sigmoid(steps, values)
    except ValueError as e:  # too few points, or a curve the form cannot take
        return {"error": str(e)}
    return dataclasses.asdict(f)


def _mode_numbers(run: Run, key: str) -> dict[str, Any]:
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


def fast_channel_numbers(run: Run) -> dict[str, Any] | None:
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


def _plot_training_reward(runs: Mapping[str, Run], path: Path, window: int = 6) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for mode, run in runs.items():
        if run.steps:
            ax.plot([r["step"] for r in run.steps],
                    running_mean([r["reward_mean"] for r in run.steps], window), label=mode)
    ax.set(xlabel="RL step", ylabel=f"training reward (running mean of {window})",
           title="Training reward")
    ax.legend()
    fig.savefig(path, dpi=120)
    return path


def _plot_fits(runs: Mapping[str, Run], fits: Mapping[str, dict], key: str, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for i, (mode, run) in enumerate(runs.items()):
        steps, vals = run.curve(key)
        if not steps:
            continue
        color = f"C{i}"
        ax.scatter(steps, vals, s=12, color=color, label=f"{mode} ({key})")
        fit = fits.get(mode, {})
        if "A" in fit:
            grid = np.linspace(min(steps), max(steps), 200)
            curve = SigmoidFit(**fit).predict(grid)
            ax.plot(grid, curve, color=color, lw=1.5,
                    label=f"{mode} fit A={fit['A']:.3f} C_mid={fit['C_mid']:.0f} B={fit['B']:.2f}")
    ax.set(xlabel="RL step", ylabel=key, title="Sigmoid fits (ScaleRL form)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return path


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
              "R - R0 = (A - R0) / (1 + (C_mid / C)^B), least squares (`fst_jax.evaluation.fit_sigmoid`). "
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


def write_report(job: CompareJob, modes: Sequence[str] = MODES, *, two_by_two: bool = True
                 ) -> dict[str, Any]:
    """Read each mode's run folder at each seed and write ``<output_dir>/report/`` (see the module
    doc); returns the summary. One seed: the per-run summary (also ``summary.json``) with
    ``"evidence"`` added; several: ``{"seeds", "per_seed": {seed: per-run summary}, "evidence"}``.
    Runs without a folder are left out; the 2x2 is skipped (with the reason in the summary)
    when the fst run has not finished or ``two_by_two`` is false. ``evidence`` is None until
    some run has per-problem logs."""
    from fst_jax.report.evidence import write_evidence

    out = Path(job.output_dir) / REPORT_DIR
    per_seed, runs_by_seed = {}, {}
    for seed in job.seeds:
        jobs = {m: mode_job(job, m, seed) for m in modes}
        runs = {m: Run.read(sub.output_dir, m) for m, sub in jobs.items()
                if (Path(sub.output_dir) / "steps.jsonl").exists()}
        if not runs:
            continue
        runs_by_seed[seed] = runs
        seed_out = out if len(job.seeds) == 1 else out / f"seed{seed}"
        per_seed[seed] = _run_report(jobs.get("fst") or next(iter(jobs.values())), runs, seed_out,
                                     two_by_two)
    if not runs_by_seed:
        raise FileNotFoundError(f"no run folders under {job.output_dir} for modes {list(modes)}")
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


def _run_report(job: TrainJob, runs: Mapping[str, Run], out: Path, two_by_two: bool
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
        tbt = two_by_two_table(job, runs["fst"].folder)
    rows = [r for run in runs.values() for r in run.eval]
    figures = [p.name for p in plot_metrics(rows, out, key)]
    figures.append(_plot_training_reward(runs, out / "training_reward.png").name)
    figures.append(_plot_fits(runs, {m: n["sigmoid"] for m, n in per_mode.items()}, key,
                              out / "sigmoid_fits.png").name)
    continual = continual_table(runs, job, key) if len(job.stages()) > 1 else None
    if continual:
        figures.append(_plot_continual(continual, out / "continual.png").name)
    summary = {
        "task": " -> ".join(st.task for st in job.stages()), "model": job.model, "steps": job.steps, "modes": list(runs),
        "problems_per_step": job.problems_per_step, "samples_per_problem": job.samples_per_problem,
        "eval_examples": job.eval.num_examples, "eval_every": job.eval.every, "reward_key": key,
        "kl_samples": job.eval.kl_samples,
        "per_mode": per_mode, "steps_to_rl_peak": peak,
        "kl_at_matched_reward": kl_at_matched_reward(runs, key), "two_by_two": tbt,
        "continual": continual,
        "fast_channel": {m: fast_channel_numbers(run) for m, run in runs.items()},
        "contexts_kept": {m: run.contexts for m, run in runs.items() if m != "rl" and run.contexts},
        "figures": figures,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(_markdown(summary))
    return summary
