"""Time one evaluation (``EvaluationHook.run``) of a config's size on the bundled model, and
optionally the same evaluation at another git revision, side by side in one run.

What runs: a config's ``eval`` settings (default ``experiments/math_cpu.yaml``: 24 problems plus
24 OOD, k 2, kl_samples 4, the 2x2) on its task and model, with the policy's weights the base
weights scaled by 1.001 (so they differ from the base and the KL is not zero) and two contexts,
the task's ``seed_context`` as the evolved one and its ``original_prompt`` (an fst-mode
evaluation). The hook runs ``--evaluations`` times on one hook, as in a run: the first call
compiles and grades the base weights' greedy 2x2 row (remembered for the run), later calls are
the steady state. Per call: wall seconds, seconds inside the sampler (``Sampler.generate``) and
inside the exact-KL scorer, and the logged metrics (the same numbers at both revisions, up to
draws, say the two do the same work).

``--baseline REV`` first checks REV out into a temporary git worktree and runs this script's
measurement there (a subprocess, the same machine), then the working tree's; each prints one
JSON line, appended to ``--out``. Measure on an idle machine: ratios under load mean nothing.

    python benchmarks/evaluation.py [--config experiments/math_cpu.yaml] [--baseline 5196c16]
        [--evaluations 2] [--out benchmarks/results_evaluation.jsonl] [--set eval.kl_samples=2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent


def measure(config: str, overrides: list[str], evaluations: int) -> dict:
    import jax

    import fst_jax.evaluation as evaluation
    from fst_jax.config import load_config
    from fst_jax.jobs.train import TrainJob
    from fst_jax.models.loading import load_model
    from fst_jax.sampling import Sampler
    from fst_jax.tasks import make_task

    job = load_config(TrainJob, config, overrides)
    seconds = {"generate": 0.0, "kl_score": 0.0}

    def timed(fn, key):
        def wrapped(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                seconds[key] += time.perf_counter() - t0
        return wrapped

    make_kl = evaluation.make_exact_kl
    evaluation.make_exact_kl = lambda *a, **kw: timed(make_kl(*a, **kw), "kl_score")
    Sampler.generate = timed(Sampler.generate, "generate")
    model, tokenizer = load_model(job.model, job.dtype, job.sampling.max_context_tokens, job.seed, job.remat)
    sampler = Sampler(model, tokenizer, job.sampling)
    base = sampler.params
    policy = jax.tree.map(lambda x: x * 1.001, base)
    task = make_task(job.task, **job.task_options)
    hook = evaluation.EvaluationHook(job.eval)
    calls = []
    for _ in range(evaluations):
        seconds.update(generate=0.0, kl_score=0.0)
        t0 = time.perf_counter()
        record = hook.run(sampler, policy, base, task, [task.seed_context], task.original_prompt)
        calls.append({"seconds": round(time.perf_counter() - t0, 1),
                      **{f"{k}_s": round(v, 1) for k, v in seconds.items()}, "metrics": record})
        print(json.dumps(calls[-1]), file=sys.stderr, flush=True)
    return {"config": config, "overrides": overrides, "task": job.task,
            "num_examples": job.eval.num_examples, "ood_tasks": list(job.eval.ood_tasks),
            "k": job.eval.k, "kl_samples": job.eval.kl_samples, "calls": calls,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=HERE.parent, check=True, capture_output=True,
                          text=True).stdout.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/math_cpu.yaml")
    parser.add_argument("--set", action="append", default=[], help="a dotted override (repeatable)")
    parser.add_argument("--evaluations", type=int, default=2)
    parser.add_argument("--baseline", help="a git revision to measure first, in a temporary worktree")
    parser.add_argument("--out", default=str(HERE / "results_evaluation.jsonl"))
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_only:  # the child: one measurement of the code on its sys.path, to stdout
        print(json.dumps(measure(args.config, args.set, args.evaluations)))
        return
    runs = []
    flags = ["--config", str(Path(args.config).resolve()), "--evaluations", str(args.evaluations),
             *[f"--set={s}" for s in args.set], "--measure-only"]
    with tempfile.TemporaryDirectory() as tmp:
        trees = []
        if args.baseline:
            tree = Path(tmp) / "baseline"
            git("worktree", "add", "--detach", str(tree), args.baseline)
            trees.append((git("rev-parse", "--short", args.baseline), tree))
        dirty = "+" if git("status", "--porcelain", "--untracked-files=no") else ""
        trees.append((git("rev-parse", "--short", "HEAD") + dirty, HERE.parent))
        try:
            for rev, tree in trees:
                env = dict(os.environ, PYTHONPATH=str(tree))
                print(f"measuring {rev} ...", file=sys.stderr, flush=True)
                out = subprocess.run([sys.executable, str(HERE / "evaluation.py"), *flags], cwd=tree,
                                     env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
                runs.append({"revision": rev, **json.loads(out.strip().splitlines()[-1])})
        finally:
            if args.baseline:
                git("worktree", "remove", "--force", str(trees[0][1]))
    line = {"benchmark": "evaluation", "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
            "runs": runs}
    if len(runs) == 2:
        line["steady_ratio"] = round(runs[1]["calls"][-1]["seconds"] / runs[0]["calls"][-1]["seconds"], 3)
        line["first_ratio"] = round(runs[1]["calls"][0]["seconds"] / runs[0]["calls"][0]["seconds"], 3)
    print(json.dumps(line))
    with open(args.out, "a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
