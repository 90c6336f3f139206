"""Plasticity probe as one job: fresh RL on task B from each arm's weights, then one report.

Phase A is a comparison (``fst-compare``) on task A whose ``rl`` and ``fst`` runs export their
final weights to ``<phase A output_dir>/<mode>/hf``. Phase B (``probe``, a ``TrainJob`` in
``mode: rl`` on task B) runs once per arm, each in ``<probe.output_dir>/<arm>_init`` and
resumable: arm ``base`` starts from ``probe.model`` (the base model), arm ``rl`` / ``fst`` from
phase A's exported weights (which are also that arm's KL reference). Phase A runs first, for the
modes the arms need, when it has not finished (``run_compare`` resumes it).

``report`` then writes ``<probe.output_dir>/report/`` (``fst_jax.report.plasticity``).

    fst-plasticity --config experiments/plasticity_cpu.yaml
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from fst_jax.config import load_config, require
from fst_jax.jobs.compare import CompareJob, mode_job, run_compare
from fst_jax.jobs.train import TrainJob, finished, run_train_job
from fst_jax.report.plasticity import write_report
from fst_jax.runs import WEIGHT_MODES

log = logging.getLogger(__name__)

ARMS = ("base", *WEIGHT_MODES)  # the base model and the final weights of each weight-training mode


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
    resumable, finished arms skipped), then ``report``."""
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
    return report(job)


def report(job: PlasticityJob) -> dict[str, Any]:
    """``fst_jax.report.plasticity.write_report`` of the arms' folders; returns its summary."""
    return write_report(job, {arm: job.arm_job(arm) for arm in job.arms})


