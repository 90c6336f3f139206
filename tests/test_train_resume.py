"""Resuming the learner from a checkpoint: the real train_step (CISPO + k3 KL with a reference copy,
AdamW with warm-up) stopped at step 3, restored in a fresh Checkpointer onto a freshly initialised
state, and continued, follows the uninterrupted run bit for bit; also across a mesh change, with
LoRA adapters, and after the newest checkpoint was damaged."""

import dataclasses
import gc
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from fst_jax.checkpoint import CheckpointConfig, Checkpointer, abstract_target
from fst_jax.models import configs
from fst_jax.models.transformer import init_model
from fst_jax.rl.batch import build_train_batch, shard_batch
from fst_jax.rl.kl import KLConfig
from fst_jax.rl.lora import LoraConfig
from fst_jax.rl.optimizer import OptimizerConfig
from fst_jax.rl.train_step import (LearnerConfig, init_train_state, make_ref_logprobs,
                                   make_train_step)
from fst_jax.sharding import MeshConfig, make_mesh

MODEL = configs.tiny("llama")
# Warm-up spans the checkpoint, so a resumed run with a wrong step count gets another lr.
CFG = LearnerConfig(kl=KLConfig(estimator="k3", beta=0.05),
                    optimizer=OptimizerConfig(lr=1e-2, warmup_steps=5))
LORA_CFG = dataclasses.replace(CFG, lora=LoraConfig(rank=4, alpha=8.0))
STEPS, SAVE_AT = 6, 3
POPULATION = ["Answer with a number only.", "Think step by step, then answer."]

# A failed tensorstore read leaves orbax's sibling read coroutines un-awaited (orbax's noise).
orbax_read_failure = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def host_batch(position: int):
    """The batch at data position ``position``: 8 rows, 4 problems with reward variance, 2
    contexts; seeded by the position, so a resumed run can find its next batch."""
    rng = np.random.default_rng(position)
    prompts = [rng.integers(1, MODEL.vocab_size, rng.integers(3, 12)) for _ in range(8)]
    comps = [rng.integers(1, MODEL.vocab_size, rng.integers(2, 14)) for _ in range(8)]
    logps = [-rng.random(len(c)) * 3 for c in comps]
    return build_train_batch(prompts, comps, logps, [float(i % 2) for i in range(8)],
                             [i // 2 for i in range(8)], [i % 2 for i in range(8)], pad_id=0)


def host_state(position: int) -> dict:
    return {"population": POPULATION, "data_position": position}


def to_host(tree):
    return jax.tree.map(np.asarray, tree)


def learner(cfg, mesh, seed=0):
    """(state, train_step, ref_logprobs) for a fresh tiny model; the two functions are new
    closures, jitted anew (as after a restart)."""
    g, state = init_train_state(init_model(MODEL, seed), cfg, mesh, seed)
    return state, make_train_step(g, state, cfg, mesh), make_ref_logprobs(g, state, cfg, mesh)


def train(state, step_fn, ref_fn, mesh, positions, on_step=lambda state, position: None):
    """Train on the batches at ``positions``; returns (state, host metrics, host states)."""
    metrics, states = [], []
    for pos in positions:
        batch = shard_batch(host_batch(pos), mesh)
        state, m = step_fn(state, batch)
        metrics.append(to_host(m))
        states.append(to_host(state))
        on_step(state, pos + 1)
    return state, metrics, states


def assert_bit_identical(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        assert np.array_equal(np.asarray(x), np.asarray(y))


def restore(directory, target_state, step=None):
    """Restore in a fresh Checkpointer, onto the abstract form of ``target_state``."""
    with Checkpointer(CheckpointConfig(directory=str(directory))) as ckpt:
        return ckpt.restore(abstract_target(target_state), step=step)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Six steps on a data=8 mesh. Saves step 3 to ``resume/`` and steps 3 and 6 to ``two/``
    (async saves; the next step donates the saved state)."""
    root = tmp_path_factory.mktemp("resume")
    mesh = make_mesh(MeshConfig(data=8))
    state, step_fn, ref_fn = learner(CFG, mesh)
    resume = Checkpointer(CheckpointConfig(directory=str(root / "resume")))
    two = Checkpointer(CheckpointConfig(directory=str(root / "two")))

    def on_step(state, position):
        if int(state.step) == SAVE_AT:
            resume.save(SAVE_AT, state, host_state(position))
        if int(state.step) in (SAVE_AT, STEPS):
            two.save(int(state.step), state, host_state(position))

    _, metrics, states = train(state, step_fn, ref_fn, mesh, range(STEPS), on_step)
    resume.close()
    two.close()
    return {"root": root, "metrics": metrics, "states": states, "step_fn": step_fn,
            "ref_fn": ref_fn}


def test_uninterrupted_run_moves_the_weights_every_step_with_warm_up(uninterrupted):
    # guards the comparisons below against a run in which nothing happens
    m = uninterrupted["metrics"]
    assert [float(x["applied"]) for x in m] == [1.0] * STEPS
    np.testing.assert_allclose([float(x["lr"]) for x in m],
                               [CFG.optimizer.lr * min(1, (i + 1) / 5) for i in range(STEPS)],
                               rtol=1e-6)
    assert all(float(x["kl"]) != 0 for x in m[1:])  # the policy left the reference copy
    params = [s.params for s in uninterrupted["states"]]
    for a, b in zip(params, params[1:]):
        assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_resumed_run_is_bit_identical_to_the_uninterrupted_one(uninterrupted):
    mesh = make_mesh(MeshConfig(data=8))
    fresh, step_fn, ref_fn = learner(CFG, mesh, seed=1)  # other weights, ref, rng: must be replaced
    restored = restore(uninterrupted["root"] / "resume", fresh)
    assert restored.step == SAVE_AT
    assert restored.host == host_state(SAVE_AT)
    state = restored.state
    # params, LoRA (empty), frozen, ref, opt_state, step, skipped and rng exactly as saved
    assert_bit_identical(to_host(state), uninterrupted["states"][SAVE_AT - 1])

    position = restored.host["data_position"]
    state, metrics, states = train(state, step_fn, ref_fn, mesh, range(position, STEPS))
    assert len(metrics) == STEPS - SAVE_AT
    for got, want in zip(metrics, uninterrupted["metrics"][SAVE_AT:]):
        assert got.keys() == want.keys()
        for key in want:
            assert np.array_equal(got[key], want[key]), key
    for got, want in zip(states, uninterrupted["states"][SAVE_AT:]):
        assert_bit_identical(got, want)
    assert int(state.step) == STEPS


def test_resume_on_another_mesh_shape_continues_the_same_trajectory(uninterrupted):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    fresh, step_fn, ref_fn = learner(CFG, mesh, seed=1)
    restored = restore(uninterrupted["root"] / "resume", fresh)
    assert restored.step == SAVE_AT
    leaves = jax.tree.leaves(restored.state)
    assert all(x.sharding.mesh.shape == mesh.shape for x in leaves)  # really on the new mesh
    assert any(x.sharding.spec != jax.sharding.PartitionSpec() for x in leaves)  # and split
    assert_bit_identical(to_host(restored.state), uninterrupted["states"][SAVE_AT - 1])

    _, metrics, _ = train(restored.state, step_fn, ref_fn, mesh, range(SAVE_AT, STEPS))
    for key in ("loss", "loss_policy", "loss_kl", "kl", "entropy"):
        np.testing.assert_allclose([float(m[key]) for m in metrics],
                                   [float(m[key]) for m in uninterrupted["metrics"][SAVE_AT:]],
                                   rtol=1e-6, atol=1e-6, err_msg=key)


def test_lora_state_round_trips_and_resumes_bit_identically(tmp_path):
    mesh = make_mesh(MeshConfig(data=8))
    state, step_fn, ref_fn = learner(LORA_CFG, mesh)
    with Checkpointer(CheckpointConfig(directory=str(tmp_path))) as ckpt:
        state, _, saved = train(state, step_fn, ref_fn, mesh, range(2),
                                lambda s, pos: pos == 2 and ckpt.save(2, s, host_state(pos)))
    _, want_metrics, want_states = train(state, step_fn, ref_fn, mesh, [2])
    assert len(jax.tree.leaves(saved[-1].lora)) > 0 and not jax.tree.leaves(saved[-1].params)

    fresh = learner(LORA_CFG, mesh, seed=1)[0]  # other adapters (and base) at seed 1
    restored = restore(tmp_path, fresh)
    assert restored.step == 2 and restored.host == host_state(2)
    assert_bit_identical(to_host(restored.state), saved[-1])
    _, metrics, states = train(restored.state, step_fn, ref_fn, mesh, [2])
    assert_bit_identical(metrics, want_metrics)
    assert_bit_identical(states, want_states)


def _truncate_largest_array_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    path = max(files, key=lambda p: p.stat().st_size)
    path.write_bytes(path.read_bytes()[:100])
    return path


@orbax_read_failure
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_step_and_trains_on(
        uninterrupted, tmp_path, caplog):
    directory = tmp_path / "two"
    shutil.copytree(uninterrupted["root"] / "two", directory)
    assert sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) == [SAVE_AT, STEPS]
    _truncate_largest_array_file(directory / str(STEPS))

    mesh = make_mesh(MeshConfig(data=8))
    fresh = learner(CFG, mesh, seed=1)[0]
    with caplog.at_level(logging.WARNING, logger="fst_jax.checkpoint"):
        restored = restore(directory, fresh)
        gc.collect()  # orbax's abandoned read coroutines warn here, under the filter above
    assert restored.step == SAVE_AT and restored.host == host_state(SAVE_AT)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and r.name == "fst_jax.checkpoint"]
    assert len(warnings) == 1 and f"step {STEPS}" in warnings[0]

    state, metrics, _ = train(restored.state, uninterrupted["step_fn"], uninterrupted["ref_fn"],
                              mesh, range(restored.host["data_position"], STEPS))
    assert_bit_identical(metrics, uninterrupted["metrics"][SAVE_AT:])
    assert_bit_identical(to_host(state), uninterrupted["states"][-1])
