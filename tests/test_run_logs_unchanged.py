"""Behaviour guard: the smoke config's rl, gepa and fst runs write exactly the logs recorded in
``tests/data/run_logs/`` (``steps.jsonl``, ``gepa.jsonl``, ``eval.jsonl``, ``eval_problems.jsonl``
without wall-clock fields), so a refactor of the loop cannot change what a run does.

The runs use the test suite's coin task (tiny random models score 0 on arithmetic, so no step
would train), evaluations every 2 steps and a deterministic callable reflection backend (the
policy backend's 4096-token meta-prompts take minutes on CPU); fst stops after 3 steps and
resumes, so restore is covered too. Floats are compared exactly: two runs of the same code on
one machine write identical logs, while a change of numerics as small as 1e-7 in a log-prob
moves later samples. Re-record (under pytest: the suite's device count and matmul precision)
only for an intended change of behaviour, such as new numerics in the model or train step::

    FST_RECORD_RUN_LOGS=1 python -m pytest -q tests/test_run_logs_unchanged.py
"""

import json
import os
import zlib
from pathlib import Path

import pytest

from fst_jax.config import load_config
from fst_jax.jobs.train import TrainJob, run_train_job
from fst_jax.metrics import read_jsonl
from coin_task import NAME as COIN_TASK

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke_fst.yaml"
RECORDED = Path(__file__).resolve().parent / "data" / "run_logs"
STREAMS = ("steps", "gepa", "eval", "eval_problems")
OVERRIDES = ("logging.tensorboard=false", f"task={COIN_TASK}", "eval.every=2", "eval.num_examples=2",
             "eval.k=2", "eval.kl_samples=1", "eval.two_by_two=true",
             "fast.gepa.reflection.backend=callable")


def reflect(prompt: str) -> str:
    """A proposal that depends only on the meta-prompt."""
    return f"```\nSolve it step by step; answer {zlib.crc32(prompt.encode()) % 97}.\n```"


def _timeless(value):
    """``value`` without wall-clock fields (keys ``seconds``, ``seconds_*``, ``wall_s*``)."""
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items()
                if not (k.startswith("seconds") or k.startswith("wall_s"))}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return value


def run_logs(mode: str, out: Path) -> dict[str, list]:
    """Run the smoke config in ``mode`` into ``out``; its streams without wall-clock fields."""
    job = load_config(TrainJob, SMOKE, [f"output_dir={out}", f"mode={mode}", *OVERRIDES])
    if mode == "fst":
        run_train_job(job, reflection_fn=reflect, max_steps_this_run=3)
    run_train_job(job, reflection_fn=reflect)
    return {s: _timeless(read_jsonl(out / f"{s}.jsonl")) for s in STREAMS}


@pytest.mark.parametrize("mode", ["rl", "gepa", "fst"])
def test_smoke_run_writes_the_recorded_logs(mode, tmp_path):
    got = run_logs(mode, tmp_path)
    if os.environ.get("FST_RECORD_RUN_LOGS"):
        (RECORDED / mode).mkdir(parents=True, exist_ok=True)
        for stream, rows in got.items():
            (RECORDED / mode / f"{stream}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for stream in STREAMS:
        assert (RECORDED / mode / f"{stream}.jsonl").exists()
        assert got[stream] == read_jsonl(RECORDED / mode / f"{stream}.jsonl"), f"{mode}/{stream}.jsonl differs from the recorded run"
