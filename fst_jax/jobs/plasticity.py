"""Plasticity probe as one job: fresh RL on task B from each arm's weights, then one report.

Phase A is a comparison (``fst-compare``) on task A whose ``rl`` and ``fst`` runs export their
final weights to ``<phase A output_dir>/<mode>/hf``. Phase B (``probe``, a ``TrainJob`` in
``mode: rl`` on task B) runs once per arm, each in ``<probe.output_dir>/<arm>_init`` and
resumable: arm ``base`` starts from ``probe.model`` (the base model), arm ``rl`` / ``fst`` from
phase A's exported weights (which are also that arm's KL reference). Phase A runs first, for the
modes the arms need, when it has not finished (``run_compare`` resumes it).

``write_plasticity_report`` writes ``<probe.output_dir>/report/``: ``plasticity.png`` (task B's
validation mean@k against step, one curve per arm) and ``summary.{md,json}`` with, per arm, the
final and best mean@k, the mean over evaluations (area under the curve per evaluation) and the
first step at which the arm reached the base arm's best.

    fst-plasticity --config experiments/plasticity_cpu.yaml
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from fst_jax.config import load_config, require
from fst_jax.jobs.compare import CompareJob, Run, finished, mean_key, mode_job, run_compare
from fst_jax.jobs.train import TrainJob, run_train_job

log = logging.getLogger(__name__)

ARMS = ("base", "rl", "fst")


@dataclasses.dataclass(frozen=True)
class PlasticityJob:
    """``phase_a``: the YAML of phase A's comparison (task A; its ``output_dir`` holds the runs);
    ``probe``: fresh RL on task B (``mode`` must be ``rl``; ``model`` is the base arm's weights);
    ``arms``: which starting weights to probe, from ``ARMS``."""

    phase_a: str = ""
    probe: TrainJob = TrainJob()
    arms: tuple[str, ...] = ARMS

    def __post_init__(self):
        require(bool(self.phase_a), "phase_a must name phase A's comparison config (a YAML path)")
        require(self.probe.mode == "rl", f"probe.mode must be 'rl' (fresh RL on task B), got {self.probe.mode!r}")
        require(len(self.arms) > 0 and len(set(self.arms)) == len(self.arms) and set(self.arms) <= set(ARMS),
                f"arms must be distinct names from {ARMS}, got {list(self.arms)}")
        require(self.probe.eval.every > 0, "probe.eval.every must be > 0: the report reads each arm's evaluations")

    def phase_a_job(self) -> CompareJob:
        return load_config(CompareJob, self.phase_a)

    def arm_job(self, arm: str) -> TrainJob:
        """Phase B from ``arm``'s weights, in ``<probe.output_dir>/<arm>_init``."""
        require(arm in ARMS, f"arm {arm!r} is not one of {ARMS}")
        model = (self.probe.model if arm == "base"
                 else str(Path(mode_job(self.phase_a_job(), arm).output_dir) / "hf"))
        return dataclasses.replace(self.probe, model=model, export_hf=False,
                                   output_dir=str(Path(self.probe.output_dir) / f"{arm}_init"))


def run_plasticity(job: PlasticityJob, *, max_steps_this_run: int | None = None) -> dict[str, Any]:
    """Phase A (the modes the arms need, if unfinished), then phase B for every arm (each
    resumable, finished arms skipped), then ``write_plasticity_report``."""
    needed = [arm for arm in job.arms if arm != "base"]
    if needed:
        phase_a = job.phase_a_job()
        if not all(finished(mode_job(phase_a, m)) for m in needed):
            log.info("plasticity: phase A (%s) first, modes %s", job.phase_a, needed)
            run_compare(phase_a, needed, max_steps_this_run=max_steps_this_run)
            if not all(finished(mode_job(phase_a, m)) for m in needed):
                log.warning("plasticity: phase A stopped early; rerun the same command to continue")
                return {}
    for arm in job.arms:
        sub = job.arm_job(arm)
        if finished(sub):
            log.info("plasticity: arm %s already finished (%s)", arm, sub.output_dir)
            continue
        log.info("plasticity: arm %s from %s in %s", arm, sub.model, sub.output_dir)
        summary = run_train_job(sub, max_steps_this_run=max_steps_this_run)
        if summary["steps_done"] < sub.steps:
            log.warning("plasticity: arm %s stopped at step %d of %d; rerun to continue", arm,
                        summary["steps_done"], sub.steps)
            return {}
    return write_plasticity_report(job)


def write_plasticity_report(job: PlasticityJob) -> dict[str, Any]:
    """Read each arm's folder and write ``<probe.output_dir>/report/`` (see the module doc)."""
    jobs = {arm: job.arm_job(arm) for arm in job.arms}
    runs = {arm: Run.read(sub.output_dir, arm) for arm, sub in jobs.items()
            if (Path(sub.output_dir) / "eval.jsonl").exists()}
    require(bool(runs), f"no arm under {job.probe.output_dir} has evaluations yet")
    key = mean_key(runs)
    curves = {arm: run.curve(key) for arm, run in runs.items()}
    reference = max(curves["base"][1]) if "base" in curves and curves["base"][1] else None
    per_arm = {}
    for arm, (steps, vals) in curves.items():
        reached = [s for s, v in zip(steps, vals) if reference is not None and v >= reference]
        per_arm[arm] = {"model": jobs[arm].model, "evaluations": len(vals),
                        "final_mean": vals[-1] if vals else None, "max_mean": max(vals) if vals else None,
                        "mean_over_evaluations": float(np.mean(vals)) if vals else None,
                        "first_step_at_base_best": reached[0] if reached else None}
    out = Path(job.probe.output_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    _plot(curves, key, job.probe.task, out / "plasticity.png")
    summary = {"phase_a": job.phase_a, "task_b": job.probe.task, "steps": job.probe.steps,
               "reward_key": key, "base_best": reference, "per_arm": per_arm,
               "figures": ["plasticity.png"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(_markdown(summary))
    return summary


def _plot(curves: dict[str, tuple[list[int], list[float]]], key: str, task: str, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for arm, (steps, vals) in curves.items():
        ax.plot(steps, vals, marker="o", ms=3, label=f"from {arm} weights")
    ax.set(xlabel=f"RL step on {task}", ylabel=key, title="Plasticity: fresh RL on task B")
    ax.legend()
    fig.savefig(path, dpi=120)
    return path


def _markdown(summary: dict[str, Any]) -> str:
    def num(v):
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    key = summary["reward_key"]
    lines = [f"# Plasticity: fresh RL on {summary['task_b']} ({summary['steps']} steps)", "",
             f"Phase A: `{summary['phase_a']}`. Base arm's best {key}: {num(summary['base_best'])}.", "",
             f"| arm | weights | final {key} | best {key} | mean over evaluations | first step at base's best |",
             "|---|---|---|---|---|---|"]
    for arm, n in summary["per_arm"].items():
        lines.append(f"| {arm} | `{n['model']}` | {num(n['final_mean'])} | {num(n['max_mean'])} | "
                     f"{num(n['mean_over_evaluations'])} | {num(n['first_step_at_base_best'])} |")
    lines += ["", "![plasticity.png](plasticity.png)"]
    return "\n".join(lines) + "\n"
