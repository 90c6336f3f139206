"""distributed helpers single-process, and a real 2-process jax.distributed run on localhost."""

import contextlib
import json
import os
import re
import signal
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
from fst_jax.models.weights import read_safetensors_folder
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
    assert distributed.any_process(True) and not distributed.any_process(False)
    distributed.sync("single")  # returns at once


def test_stop_signal_turns_sigterm_into_an_agreed_stop_then_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    stop = distributed.StopSignal()
    try:
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received and stop.agreed()
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before


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


@contextlib.contextmanager
def _train_runs(runs: dict[str, int], *overrides: str):
    """The train CLI once per ``{output folder: processes}`` entry, all started at once: one
    process gets 4 devices, two processes 2 devices each (joined on a free localhost port).
    Process ``i`` of folder ``F`` logs to ``F.i.log``. Yields ``{folder: [Popen, ...]}``; no
    process outlives the block."""
    base = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    procs: dict[str, list[subprocess.Popen]] = {}
    try:
        for out, n in runs.items():
            env = {**base, "XLA_FLAGS": f"--xla_force_host_platform_device_count={4 // n}"}
            if n > 1:
                env.update(FST_COORDINATOR=f"localhost:{_free_port()}", FST_NUM_PROCESSES=str(n))
            procs[out] = []
            for pid in range(n):
                with open(f"{out}.{pid}.log", "w") as log:
                    procs[out].append(subprocess.Popen(
                        _train_command(Path(out), *overrides), stdout=log,
                        stderr=subprocess.STDOUT, env={**env, "FST_PROCESS_ID": str(pid)}))
        yield procs
    finally:
        for proc in (p for ps in procs.values() for p in ps):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _outputs(procs: dict[str, list[subprocess.Popen]], timeout_s: float = 600) -> dict[str, list[str]]:
    """Every process's log, asserting that each exits 0 within ``timeout_s`` (all together)."""
    deadline, logs = time.monotonic() + timeout_s, {}
    for out, ps in procs.items():
        for pid, proc in enumerate(ps):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        logs[out] = [Path(f"{out}.{pid}.log").read_text() for pid in range(len(ps))]
        for pid, proc in enumerate(ps):
            assert proc.returncode == 0, (f"{out} process {pid}: exit {proc.returncode} "
                                          f"(None: still running)\n{logs[out][pid][-3000:]}")
    return logs


def _read(run: Path, stream: str) -> list[dict]:
    return [json.loads(line) for line in (run / f"{stream}.jsonl").read_text().splitlines()]


@pytest.mark.multiprocess
def test_fst_loop_on_two_processes_follows_the_single_process_run(tmp_path):
    """The whole loop (GEPA rounds with the policy reflector, rollouts, rewards, train steps,
    evaluation, checkpoints) on 2 processes x 2 devices matches one process with 4 devices."""
    runs = {str(tmp_path / "single"): 1, str(tmp_path / "multi"): 2}
    with _train_runs(runs, "eval.every=2", "eval.num_examples=4", "eval.k=2") as procs:
        logs = _outputs(procs)
    assert ("process 1 of 2; mesh {'data': 4, 'fsdp': 1, 'tensor': 1} over 4 devices"
            in logs[str(tmp_path / "multi")][1])

    def read(run: str, stream: str) -> list[dict]:
        return _read(tmp_path / run, stream)

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


FSDP_RL = ("mode=rl", "mesh.data=1", "mesh.fsdp=4", "export_hf=true")  # params span both processes


def _hf_matches(got: Path, want: Path) -> None:
    """The HF folders hold the same files, config and tensors. Adam divides by |grad|, so
    reduction-order noise in near-zero gradients shows up at ~lr * 1e-2 in the weights."""
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    assert (got / "config.json").read_text() == (want / "config.json").read_text()
    got_t, want_t = read_safetensors_folder(got), read_safetensors_folder(want)
    assert sorted(got_t) == sorted(want_t)
    for name, w in want_t.items():
        np.testing.assert_allclose(got_t[name], w, rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.multiprocess
def test_two_process_fsdp_run_exports_the_single_process_hf_folder(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    with _train_runs({str(single): 1, str(multi): 2}, *FSDP_RL, "steps=2") as procs:
        logs = _outputs(procs)
    assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in logs[str(multi)][1]
    _hf_matches(multi / "hf", single / "hf")
    assert json.loads((multi / "result.json").read_text())["hf_folder"] == str(multi / "hf")


def _steps_done(log: str) -> int:
    """``steps_done`` of the summary the train CLI prints."""
    return int(re.findall(r'"steps_done": (\d+)', log)[-1])


@pytest.mark.multiprocess
def test_sigterm_to_one_of_two_processes_stops_both_at_one_checkpoint_and_resume_matches(tmp_path):
    """SIGTERM to process 1 alone: both processes save the same step and stop; rerunning
    finishes a run whose steps and exported weights match an uninterrupted run's."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    overrides = (*FSDP_RL, "steps=4", "checkpoint.save_every_steps=0")
    with _train_runs({str(single): 1, str(multi): 2}, *overrides) as procs:
        rows = multi / "steps.jsonl"
        while not (rows.exists() and rows.read_text()):  # in the loop: handlers installed
            assert all(p.poll() is None for p in procs[str(multi)])
            time.sleep(0.05)
        procs[str(multi)][1].send_signal(signal.SIGTERM)
        logs = _outputs(procs)
    stopped = [_steps_done(log) for log in logs[str(multi)]]
    assert stopped[0] == stopped[1] < 4, stopped
    assert sorted(int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == [stopped[0]]

    with _train_runs({str(multi): 2}, *overrides) as procs:
        logs = _outputs(procs)
    assert [_steps_done(log) for log in logs[str(multi)]] == [4, 4]
    want, got = _read(single, "steps"), _read(multi, "steps")
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    for key in ("reward_mean", "completion_tokens", "loss", "kl", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-4,
                                   atol=1e-6, err_msg=key)
    _hf_matches(multi / "hf", single / "hf")
