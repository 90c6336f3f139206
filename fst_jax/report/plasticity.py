"""The plasticity probe's report: task B's validation mean@k of each arm (fresh RL from the base,
rl- and fst-trained weights; ``fst_jax.jobs.plasticity`` runs them).

``<probe.output_dir>/report/``: ``plasticity.png`` (mean@k against step, one curve per arm) and
``summary.{md,json}`` with, per arm, the final and best mean@k, the mean over evaluations (area
under the curve per evaluation) and the first step at which the arm reached the base arm's best.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from fst_jax.config import require
from fst_jax.report.comparison import mean_key
from fst_jax.report.figures import plot_plasticity
from fst_jax.runs import EVAL, RunFolder

if TYPE_CHECKING:
    from fst_jax.jobs.plasticity import PlasticityJob
    from fst_jax.jobs.train import TrainJob


def write_report(job: PlasticityJob, jobs: Mapping[str, TrainJob]) -> dict[str, Any]:
    """Read each arm's folder (``jobs[arm].output_dir``) and write
    ``<job.probe.output_dir>/report/`` (see the module doc); returns the summary."""
    folders = {arm: RunFolder(sub.output_dir) for arm, sub in jobs.items()}
    runs = {arm: f.read(arm) for arm, f in folders.items() if f.stream(EVAL).exists()}
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
    plot_plasticity(curves, key, job.probe.task, out / "plasticity.png")
    summary = {"phase_a": job.phase_a, "task_b": job.probe.task, "steps": job.probe.steps,
               "reward_key": key, "base_best": reference, "per_arm": per_arm,
               "figures": ["plasticity.png"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(_markdown(summary))
    return summary


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
