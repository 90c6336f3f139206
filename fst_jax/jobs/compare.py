"""Side-by-side runner: rl, gepa and fst from one ``CompareJob`` config (a ``TrainJob`` plus
``seeds`` and the pre-stated comparisons), then one report.

``run_compare(job)`` runs every mode at every seed (seed by seed, modes in turn) on the same
data and seeds (``mode_job``: the config with ``mode=<m>``, the seed applied by ``seeded``,
``export_hf=true``, in ``<output_dir>/<m>`` for one seed, ``<output_dir>/<m>/seed<k>`` for
several), each resumable: a finished run is skipped, an unfinished one continues from its
checkpoints, and a run that stops early (SIGTERM, ``max_steps_this_run``) ends the sequence.
``report(job)`` then writes ``<output_dir>/report/`` from the run folders
(``fst_jax.report.comparison``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from fst_jax.config import require
from fst_jax.jobs.train import TrainJob, finished, run_train_job
from fst_jax.report.comparison import write_report
from fst_jax.runs import MODES

log = logging.getLogger(__name__)


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
    absolute ``checkpoint.directory`` gets the same suffix); ``export_hf`` on unless the job's
    evaluations log the 2x2 (``eval.two_by_two``), which the report otherwise computes from the
    fst run's weights: a finished run is then its logs alone."""
    require(mode in MODES, f"mode {mode!r} is not one of {tuple(MODES)}")
    seed = job.seeds[0] if seed is None else seed
    require(seed in job.seeds, f"seed {seed} is not one of the comparison's seeds {list(job.seeds)}")
    sub = Path(mode) if len(job.seeds) == 1 else Path(mode) / f"seed{seed}"
    ckpt = job.checkpoint
    if Path(ckpt.directory).is_absolute():
        ckpt = dataclasses.replace(ckpt, directory=str(Path(ckpt.directory) / sub))
    return dataclasses.replace(seeded(job.train_job(), seed), mode=mode,
                               output_dir=str(Path(job.output_dir) / sub),
                               export_hf=job.export_hf or not job.eval.two_by_two,
                               checkpoint=ckpt)


def run_compare(job: CompareJob, modes: Sequence[str] = tuple(MODES), *,
                reflection_fn: Callable[[str], str] | None = None,
                max_steps_this_run: int | None = None, two_by_two: bool = True
                ) -> dict[str, Any]:
    """Run (or resume) ``modes`` at every seed (seed by seed, modes in order), then
    ``report``; returns its summary. ``max_steps_this_run`` bounds each run's steps
    in this invocation (time-sliced runs)."""
    require(job.eval.every > 0, "eval.every must be > 0: the comparison reads each run's eval.jsonl")
    require(len(modes) > 0 and len(set(modes)) == len(modes) and set(modes) <= set(MODES),
            f"modes must be distinct names from {tuple(MODES)}, got {list(modes)}")
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
    return report(job, modes, two_by_two=two_by_two)


def report(job: CompareJob, modes: Sequence[str] = tuple(MODES), *, two_by_two: bool = True
           ) -> dict[str, Any]:
    """``fst_jax.report.comparison.write_report`` of ``modes``' runs at every seed; returns its
    summary."""
    return write_report(job, {seed: {m: mode_job(job, m, seed) for m in modes} for seed in job.seeds},
                        two_by_two=two_by_two)
