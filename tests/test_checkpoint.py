"""Checkpointer: round trips, retention, async saves, resharding on restore, corruption fallback."""

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fst_jax import sharding
from fst_jax.checkpoint import (COMMIT_MARKER, CheckpointConfig, Checkpointer, abstract_target,
                                fingerprint)
from fst_jax.config import ConfigError
from fst_jax.models.configs import tiny
from fst_jax.models.transformer import init_model


def _config(tmp_path, **kw):
    kw.setdefault("async_save", False)
    return CheckpointConfig(directory=str(tmp_path / "ckpt"), **kw)


def _small_state(step: int):
    """A state whose every leaf depends on ``step`` (so steps are distinguishable)."""
    return {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64) * 0.5 + step,
            "step": jnp.int32(step), "rng": jax.random.key(step)}


def _save_steps(ckpt, steps):
    for s in steps:
        ckpt.save(s, _small_state(s), {"step": s, "contexts": [f"context {s}"]})
    ckpt.wait()


def _assert_same(a, b):
    def unwrap(x):
        return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                          else x)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(unwrap(x), unwrap(y))


def _train_state(mesh):
    params = sharding.shard_state(nnx.split(init_model(tiny()))[1], mesh)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments and count
    return {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
            "step": jnp.int32(7), "rng": jax.random.key(42)}


# -- config ------------------------------------------------------------------------------------
def test_config_rejects_nonsense_values():
    with pytest.raises(ConfigError):
        CheckpointConfig(keep_last=0)
    with pytest.raises(ConfigError):
        CheckpointConfig(save_every_minutes=-1)


# -- round trips -------------------------------------------------------------------------------
def test_round_trip_restores_params_optimizer_step_rng_and_host_json(tmp_path):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=8))
    state = _train_state(mesh)
    host = {"population": ["Be brief.", "Think step by step."], "pareto": [[0.5, 1.0], [1, 0]],
            "data_position": 123, "rng": [1, 2, 3]}
    with Checkpointer(_config(tmp_path)) as ckpt:
        ckpt.save(7, state, host)
        restored = ckpt.restore(abstract_target(state))
    assert restored.step == 7
    assert restored.host == host
    _assert_same(restored.state, state)
    assert isinstance(restored.state["params"], nnx.State)
    wq = restored.state["params"]["layers"]["wq"]
    assert wq.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")
    assert wq[...].sharding == state["params"]["layers"]["wq"][...].sharding


def test_async_save_returns_before_commit_and_restores_after_wait(tmp_path):
    with Checkpointer(_config(tmp_path, async_save=True)) as ckpt:
        state = _small_state(5)
        ckpt.save(5, state, {"step": 5})
        ckpt.wait()
        assert (ckpt.directory / "5" / COMMIT_MARKER).exists()
        restored = ckpt.restore(abstract_target(state))
    assert restored.step == 5 and restored.host == {"step": 5}
    _assert_same(restored.state, state)


def test_async_save_then_restore_without_explicit_wait(tmp_path):
    with Checkpointer(_config(tmp_path, async_save=True)) as ckpt:
        _save_steps(ckpt, [1])
        ckpt.save(2, _small_state(2), {"step": 2})
        restored = ckpt.restore(abstract_target(_small_state(0)))
    assert restored.step == 2


@pytest.mark.parametrize("layout", ["fsdp2_tensor2_data2", "one_device"])
def test_restore_onto_a_different_mesh_shape_gives_equal_values(tmp_path, layout):
    saved = _train_state(sharding.make_mesh(sharding.MeshConfig(data=8)))
    with Checkpointer(_config(tmp_path)) as ckpt:
        ckpt.save(1, saved, {"k": 1})
    if layout == "one_device":
        mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
    else:
        mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    fresh = _train_state(mesh)  # same structure, laid out on the new mesh
    with Checkpointer(_config(tmp_path)) as ckpt:
        restored = ckpt.restore(abstract_target(fresh))
    _assert_same(restored.state, saved)
    for got, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(fresh)):
        assert got.sharding == want.sharding


def test_fingerprint_does_not_depend_on_the_mesh():
    a = _train_state(sharding.make_mesh(sharding.MeshConfig(data=8)))
    b = _train_state(sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2)))
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint({**a, "step": jnp.int32(8)})


# -- policy ------------------------------------------------------------------------------------
def test_keeps_the_last_n_steps_and_every_mth_step(tmp_path):
    with Checkpointer(_config(tmp_path, keep_last=2, keep_every=4)) as ckpt:
        _save_steps(ckpt, range(1, 11))
        assert ckpt.all_steps() == [4, 8, 9, 10]


def test_save_decision_by_step_count(tmp_path):
    with Checkpointer(_config(tmp_path, save_every_steps=3)) as ckpt:
        saved = [s for s in range(1, 8) if ckpt.maybe_save(s, _small_state(s), {})]
        ckpt.wait()
        assert saved == [3, 6] and ckpt.all_steps() == [3, 6]


def test_save_decision_by_elapsed_minutes(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("fst_jax.checkpoint.time.monotonic", lambda: clock[0])
    with Checkpointer(_config(tmp_path, save_every_steps=0, save_every_minutes=2)) as ckpt:
        assert not ckpt.should_save(1)
        clock[0] += 119
        assert not ckpt.should_save(2)
        clock[0] += 2
        assert ckpt.maybe_save(3, _small_state(3), {})
        assert not ckpt.should_save(4)  # the clock restarts at each save


def test_non_json_host_state_fails_before_anything_is_written(tmp_path):
    with Checkpointer(_config(tmp_path)) as ckpt:
        with pytest.raises(TypeError):
            ckpt.save(1, _small_state(1), {"bad": object()})
        assert ckpt.all_steps() == []


def test_saving_an_existing_step_moves_the_old_one_aside(tmp_path):
    with Checkpointer(_config(tmp_path)) as ckpt:
        _save_steps(ckpt, [1])
        ckpt.save(1, _small_state(11), {"step": 11})
        restored = ckpt.restore(abstract_target(_small_state(0)))
        assert restored.host == {"step": 11}
        assert len(list(ckpt.directory.glob("1.replaced-*"))) == 1


# -- fresh starts ------------------------------------------------------------------------------
def test_missing_directory_means_fresh_start(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fst_jax.checkpoint")
    with Checkpointer(_config(tmp_path / "does" / "not" / "exist")) as ckpt:
        assert ckpt.restore(abstract_target(_small_state(0))) is None
    assert "starting fresh" in caplog.text


def test_no_valid_step_means_fresh_start(tmp_path, caplog):
    with Checkpointer(_config(tmp_path)) as ckpt:
        _save_steps(ckpt, [1])
        (ckpt.directory / "1" / COMMIT_MARKER).unlink()
        assert ckpt.restore(abstract_target(_small_state(0))) is None
    assert "no valid checkpoint" in caplog.text


# -- corruption --------------------------------------------------------------------------------
def _largest_array_file(step_dir) -> Path:
    files = [p for p in Path(step_dir, "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate_array_file(step_dir):
    path = _largest_array_file(step_dir)
    path.write_bytes(path.read_bytes()[:100])


def _garbage_array_file(step_dir):
    path = _largest_array_file(step_dir)
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def _zero_bytes_inside_array_file(step_dir):
    # Leaves the file decodable but the values wrong: only the fingerprint catches this.
    path = _largest_array_file(step_dir)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 256] = bytes(256)
    path.write_bytes(bytes(data))


def _delete_host_json(step_dir):
    (step_dir / "host" / "metadata").unlink()


def _malformed_host_json(step_dir):
    (step_dir / "host" / "metadata").write_text('{"step": 3, "contexts": ["unterminated')


def _host_json_not_an_object(step_dir):
    (step_dir / "host" / "metadata").write_text('["a list"]')


def _remove_commit_marker(step_dir):
    (step_dir / COMMIT_MARKER).unlink()


CORRUPTIONS = {
    "truncated array file": (_truncate_array_file, ""),
    "garbage array file": (_garbage_array_file, ""),
    "zeroed bytes in array file": (_zero_bytes_inside_array_file, ""),
    "missing host json": (_delete_host_json, "not found"),
    "malformed host json": (_malformed_host_json, "JSONDecodeError"),
    "host json not an object": (_host_json_not_an_object, "not a JSON object"),
    "missing commit marker": (_remove_commit_marker, "never committed"),
}

# A failed tensorstore read leaves orbax's sibling read coroutines un-awaited (orbax's noise).
orbax_read_failure = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@orbax_read_failure
@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_corrupt_newest_step_falls_back_to_previous_step(tmp_path, caplog, corrupt):
    damage, reason = CORRUPTIONS[corrupt]
    with Checkpointer(_config(tmp_path)) as ckpt:
        _save_steps(ckpt, [1, 2, 3])
        damage(ckpt.directory / "3")
        restored = ckpt.restore(abstract_target(_small_state(0)))
        assert ckpt.all_steps() == [1, 2, 3]  # the fallback deletes nothing
    assert restored.step == 2
    # arrays and host state both come from step 2
    assert restored.host == {"step": 2, "contexts": ["context 2"]}
    _assert_same(restored.state, _small_state(2))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and r.name == "fst_jax.checkpoint"]
    assert len(warnings) == 1 and "step 3" in warnings[0] and "unusable" in warnings[0]
    assert reason in warnings[0]


def test_half_written_step_directory_is_ignored(tmp_path):
    with Checkpointer(_config(tmp_path)) as ckpt:
        _save_steps(ckpt, [1, 2])
        # What an interrupted save leaves behind: orbax's uncommitted temporary directory.
        (ckpt.directory / "2").rename(ckpt.directory / "3.orbax-checkpoint-tmp-1234")
        restored = ckpt.restore(abstract_target(_small_state(0)))
    assert restored.step == 1 and restored.host["step"] == 1
    assert (tmp_path / "ckpt" / "3.orbax-checkpoint-tmp-1234").exists()


@orbax_read_failure
def test_fallback_skips_several_broken_steps(tmp_path):
    with Checkpointer(_config(tmp_path)) as ckpt:
        _save_steps(ckpt, [1, 2, 3])
        _garbage_array_file(ckpt.directory / "3")
        _malformed_host_json(ckpt.directory / "2")
        restored = ckpt.restore(abstract_target(_small_state(0)))
    assert restored.step == 1
    _assert_same(restored.state, _small_state(1))


def test_explicit_broken_step_raises(tmp_path):
    with Checkpointer(_config(tmp_path)) as ckpt:
        _save_steps(ckpt, [1, 2])
        _malformed_host_json(ckpt.directory / "2")
        with pytest.raises(ValueError, match="step 2 .* unusable"):
            ckpt.restore(abstract_target(_small_state(0)), step=2)
        assert ckpt.restore(abstract_target(_small_state(0)), step=1).host["step"] == 1
        with pytest.raises(ValueError, match="not found"):
            ckpt.restore(abstract_target(_small_state(0)), step=9)


@orbax_read_failure
def test_resume_after_fallback_can_save_over_the_broken_step(tmp_path):
    with Checkpointer(_config(tmp_path)) as ckpt:
        _save_steps(ckpt, [1, 2])
        _garbage_array_file(ckpt.directory / "2")
        assert ckpt.restore(abstract_target(_small_state(0))).step == 1
        _save_steps(ckpt, [2])
        assert ckpt.restore(abstract_target(_small_state(0))).step == 2
        assert len(list(ckpt.directory.glob("2.replaced-*"))) == 1


def test_host_json_round_trips_unicode_and_nesting(tmp_path):
    host = {"contexts": ["Réponds en français.", "数学"], "nested": {"a": [1, 2.5, None, True]}}
    with Checkpointer(_config(tmp_path)) as ckpt:
        ckpt.save(1, _small_state(1), host)
        assert ckpt.restore(abstract_target(_small_state(0))).host == host
    assert json.loads((tmp_path / "ckpt" / "1" / "host" / "metadata").read_text()) == host


def test_restoring_onto_a_differently_shaped_state_raises_instead_of_starting_fresh(tmp_path):
    # A config mismatch is the caller's error, not damage: silently starting fresh would let the
    # retention policy delete the good checkpoints later.
    with Checkpointer(_config(tmp_path)) as ckpt:
        _save_steps(ckpt, [1])
        other = {**_small_state(0), "w": jnp.zeros((32, 64))}
        with pytest.raises(ValueError, match="does not fit the target"):
            ckpt.restore(abstract_target(other))
