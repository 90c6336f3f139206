"""distributed helpers single-process, and a real 2-process jax.distributed run on localhost."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import multihost_worker as worker
from fst_jax import distributed, sharding
from fst_jax.checkpoint import CheckpointConfig, Checkpointer, abstract_target
from fst_jax.rl.batch import process_rows

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


def test_initialize_without_coordinator_is_a_noop(monkeypatch):
    for var in ("FST_COORDINATOR", "FST_NUM_PROCESSES", "FST_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() is False
    monkeypatch.setenv("FST_COORDINATOR", "localhost:1234")
    monkeypatch.setenv("FST_NUM_PROCESSES", "1")
    assert distributed.initialize() is False
    assert jax.process_count() == 1 and distributed.is_primary()


def test_single_process_broadcast_is_a_json_round_trip():
    assert distributed.broadcast_host_object(("a", {"b": [1, 2.5]})) == ["a", {"b": [1, 2.5]}]
    with pytest.raises(TypeError):
        distributed.broadcast_host_object({"x": object()})


def test_single_process_agreement_and_sync():
    assert distributed.all_processes_agree(True) and not distributed.all_processes_agree(False)
    distributed.sync("single")  # returns at once


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _processes(out_dir: Path, num_processes: int = 2):
    """Start the worker processes; yields ``wait()``, which asserts they all exit 0 in time.
    Whatever happens, no process outlives the block."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    port = _free_port()
    procs, logs = [], []

    def wait():
        deadline = time.monotonic() + TIMEOUT_S
        for pid, proc in enumerate(procs):
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            log = (out_dir / f"process_{pid}.log").read_text()
            assert rc == 0, f"process {pid} exited {rc}:\n{log[-3000:]}"

    try:
        for pid in range(num_processes):
            logs.append(open(out_dir / f"process_{pid}.log", "w"))
            procs.append(subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "multihost_worker.py"), str(port), str(pid),
                 str(num_processes), str(out_dir)], env=env, stdout=logs[-1],
                stderr=subprocess.STDOUT))
        yield wait
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


@pytest.mark.multiprocess
def test_two_processes_share_contexts_and_match_single_process_training(tmp_path):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=4), devices=jax.devices()[:4])
    with _processes(tmp_path) as wait:
        # single-process reference of the same global batch, meanwhile
        want_losses, want_state = worker.train(mesh)
        wait()
    results = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in range(2)]

    # (a) process 0's contexts reach every process
    assert [r["contexts"] for r in results] == [worker.CONTEXTS] * 2
    assert all(r["process_count"] == 2 and r["device_count"] == 4 for r in results)

    # (a') each process scored only its share of the rows, and every process has every result
    assert [r["scored_here"] for r in results] == [[0, 1, 2], [3, 4, 5, 6]]
    want_scored = [[r / 10, f"row {r}: c{r}"] for r in range(worker.SCORED_ROWS)]
    assert [r["scored"] for r in results] == [want_scored] * 2

    # (a'') an example that differs between processes is dropped on both
    assert [r["agreed"] for r in results] == [["e0", "e1", "e3", "e4"]] * 2

    # (b) each process fed only its half of the batch to the project's train_step, and the
    # sharded 2-process run follows the single-process run of the same global batch
    assert [r["local_rows"] for r in results] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert process_rows(mesh, worker.GLOBAL_BATCH) == list(range(worker.GLOBAL_BATCH))
    for r in results:
        np.testing.assert_allclose(r["losses"], want_losses, rtol=1e-5, atol=1e-5)
    assert len(set(want_losses)) == worker.STEPS  # every step changed the weights

    # (c) the TrainState both processes checkpointed together restores here, on another mesh.
    # Adam divides by |grad|, so reduction-order noise in near-zero gradients shows up at
    # ~lr * 1e-3 in the weights.
    assert [r["saved"] for r in results] == [True, True]
    with Checkpointer(CheckpointConfig(directory=str(tmp_path / "ckpt"))) as ckpt:
        restored = ckpt.restore(abstract_target(want_state))
    assert restored.step == worker.STEPS and restored.host == {"contexts": worker.CONTEXTS}
    got = restored.state
    assert int(got.step) == worker.STEPS and int(got.skipped) == 0
    np.testing.assert_array_equal(np.asarray(got.rng), np.asarray(want_state.rng))
    for part in ("params", "ref", "opt_state"):
        pairs = zip(jax.tree.leaves(getattr(got, part)), jax.tree.leaves(getattr(want_state, part)))
        for g, w in pairs:
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-4,
                                       err_msg=part)


def _train_command(out: Path, *overrides: str) -> list[str]:
    """The FST loop's CLI on the smoke config with the coin task (every group has variance)."""
    return [sys.executable, str(REPO / "tests" / "coin_task.py"), "train", "--config",
            str(REPO / "experiments" / "smoke_fst.yaml"), f"output_dir={out}",
            "task=test_coin_arithmetic", "logging.tensorboard=false", *overrides]


@pytest.mark.multiprocess
def test_fst_loop_on_two_processes_follows_the_single_process_run(tmp_path):
    """The whole loop (GEPA rounds with the policy reflector, rollouts, rewards, train steps,
    evaluation, checkpoints) on 2 processes x 2 devices matches one process with 4 devices."""
    base = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    overrides = ("eval.every=2", "eval.num_examples=4", "eval.k=2")
    port = _free_port()
    procs = []
    try:
        single = subprocess.Popen(
            _train_command(tmp_path / "single", *overrides), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
        for pid in range(2):
            procs.append(subprocess.Popen(
                _train_command(tmp_path / "multi", *overrides), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                     "FST_COORDINATOR": f"localhost:{port}", "FST_NUM_PROCESSES": "2",
                     "FST_PROCESS_ID": str(pid)}))
        logs = []
        for name, proc in [("single", single), ("process 0", procs[0]), ("process 1", procs[1])]:
            logs.append(proc.communicate(timeout=600)[0].decode())
            assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{logs[-1][-3000:]}"
        assert "process 1 of 2; mesh {'data': 4, 'fsdp': 1, 'tensor': 1} over 4 devices" in logs[2]
    finally:
        for proc in [*procs, single]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def read(run: str, stream: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / run / f"{stream}.jsonl").read_text().splitlines()]

    want, got = read("single", "steps"), read("multi", "steps")
    assert [r["step"] for r in got] == [0, 1, 2, 3]  # process 0 alone wrote, once per step
    for key in ("reward_mean", "reward_context_0", "reward_context_1", "completion_tokens", "loss", "kl",
                "grad_norm"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-4,
                                   atol=1e-6, err_msg=key)
    assert len({r["loss"] for r in got}) > 1  # the weights changed every step
    contexts = lambda rows: [[c["context"] for c in r["contexts"]] for r in rows]  # noqa: E731
    assert contexts(read("multi", "gepa")) == contexts(read("single", "gepa"))
    evals = [read(run, "eval") for run in ("multi", "single")]
    assert [r["step"] for r in evals[0]] == [0, 2, 4]
    for key in ("eval/mean@2", "eval/pass@1", "eval/kl_to_base"):
        np.testing.assert_allclose(*([r[key] for r in e] for e in evals), rtol=1e-4, atol=1e-6,
                                   err_msg=key)
    saved = sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == "4"
