"""A run killed with SIGKILL at random moments and restarted with the same command follows the
uninterrupted run: same per-step metrics, GEPA rounds, kept contexts and final weights.

Every run is a separate ``fst-train`` process on the smoke config (tiny model, fst mode, a
checkpoint every step); the kill points come from a seeded RNG.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coin_task import NAME as COIN_TASK
from fst_jax.metrics import read_jsonl

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke_fst.yaml"
WORKER = Path(__file__).resolve().parent / "coin_task.py"  # registers the coin task, runs the CLI
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}


def command(out: Path) -> list[str]:
    return [sys.executable, str(WORKER), "train", "--config", str(SMOKE), f"output_dir={out}",
            f"task={COIN_TASK}", "steps=4", "checkpoint.save_every_steps=1", "logging.tensorboard=false"]


def run_to_end(out: Path) -> None:
    subprocess.run(command(out), env=ENV, check=True, capture_output=True, timeout=900)


def kill_after(out: Path, lines: int, delay: float) -> None:
    """Start a run; SIGKILL it ``delay`` seconds after ``steps.jsonl`` has ``lines`` lines."""
    proc = subprocess.Popen(command(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while len(read_jsonl(out / "steps.jsonl")) < lines and proc.poll() is None:
        assert time.monotonic() < deadline, "run made no progress"
        time.sleep(0.2)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def outcome(out: Path) -> dict:
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]  # noqa: E731
    final = out / "checkpoints" / "4" / "meta" / "metadata"
    return {"steps": strip(read_jsonl(out / "steps.jsonl")), "gepa": strip(read_jsonl(out / "gepa.jsonl")),
            "contexts": json.loads((out / "contexts.json").read_text()),
            "fingerprint": json.loads(final.read_text())["fingerprint"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    run_to_end(out)
    return outcome(out)


@pytest.mark.parametrize("trial", [0, 1])
def test_sigkill_at_a_random_moment_then_resume_follows_the_uninterrupted_run(trial, uninterrupted, tmp_path):
    rng = random.Random(trial)
    kill_after(tmp_path, lines=rng.randint(1, 3), delay=rng.uniform(0.0, 2.0))
    assert not (tmp_path / "result.json").exists(), "the run finished before it was killed"
    run_to_end(tmp_path)
    assert outcome(tmp_path) == uninterrupted
