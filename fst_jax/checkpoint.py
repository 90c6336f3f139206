"""Checkpoints: the device state (orbax) and the host state (JSON), one step, committed together.

A step directory ``<directory>/<step>/`` holds three orbax items written by one composite save,
so the step is either complete (orbax commits it with an atomic rename and a
``commit_success.txt`` marker) or absent:

- ``state``: any pytree of arrays (params, optimizer state, step, rng keys; ``nnx.State`` is fine),
- ``host``: a JSON-serialisable dict (fast-weight population, Pareto scores, data position, ...),
- ``meta``: a fingerprint of every array leaf, checked on restore to catch silent corruption.

Usage from a training loop (all processes call every method)::

    ckpt = Checkpointer(CheckpointConfig(directory="runs/x/ckpt"))
    restored = ckpt.restore(abstract_target(state))          # None: fresh start
    if restored is not None:
        state, host = restored.state, restored.host
    for step in ...:
        state = train_step(state, batch)
        ckpt.maybe_save(step, state, host_state_dict)        # decision shared by all processes
    ckpt.close()                                             # waits for the last async save

Restore takes the newest step that is committed and reads back intact; a broken step is logged
as a warning naming the step and the reason, skipped (never deleted), and the one before it is
tried. An intact step whose array shapes differ from the target raises ``ValueError`` (a config
mismatch must not look like a fresh start). Saving a step number that already exists moves the
old directory aside, never deletes it. ``directory`` may be local or a cloud URL (``gs://``);
with several processes it must be storage that all of them see.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from fst_jax import distributed
from fst_jax.config import require

logger = logging.getLogger(__name__)

COMMIT_MARKER = "commit_success.txt"
_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where and when to checkpoint.

    ``keep_last``: newest steps kept. ``keep_every``: also keep every step divisible by it
    (0: off). A step is saved when ``step % save_every_steps == 0`` (0: off) or
    ``save_every_minutes`` have passed since the last save (0: off). ``async_save`` writes in a
    background thread after the arrays are copied to host memory.
    """

    directory: str = "checkpoints"
    keep_last: int = 3
    keep_every: int = 0
    save_every_steps: int = 100
    save_every_minutes: float = 0.0
    async_save: bool = True

    def __post_init__(self):
        require(bool(self.directory), "checkpoint directory must be set")
        require(self.keep_last >= 1, "checkpoint keep_last must be >= 1")
        require(self.keep_every >= 0, "checkpoint keep_every must be >= 0 (0: off)")
        require(self.save_every_steps >= 0, "checkpoint save_every_steps must be >= 0 (0: off)")
        require(self.save_every_minutes >= 0, "checkpoint save_every_minutes must be >= 0 (0: off)")

    def under(self, output_dir: str | Path) -> "CheckpointConfig":
        """This config with a relative ``directory`` placed inside ``output_dir``."""
        directory = Path(self.directory)
        return dataclasses.replace(self, directory=str(directory if directory.is_absolute()
                                                        else Path(output_dir) / directory))


class Restored(NamedTuple):
    """A restored step: the array state (on the target's shardings) and the host JSON dict."""

    step: int
    state: Any
    host: dict[str, Any]


def abstract_target(tree: Any, shardings: Any = None) -> Any:
    """``tree`` with every array leaf replaced by a ``jax.ShapeDtypeStruct`` carrying a sharding.

    The sharding comes from ``shardings`` (a tree of the same structure, e.g.
    ``sharding.state_shardings(state, mesh)``) or else from each leaf's own ``.sharding``.
    ``tree`` may itself be abstract (``nnx.eval_shape``); then ``shardings`` is required.
    """
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _leaf_bits(x: jax.Array) -> jax.Array:
    """The leaf's raw bits widened to uint32 (keys by their key data)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width)
    if x.dtype.itemsize == 8:  # only with jax_enable_x64: fold the high word in
        bits = bits ^ (bits >> 32)
    return bits.astype(jnp.uint32)


@jax.jit
def _leaf_checksum(x: jax.Array) -> jax.Array:
    # Integer sums wrap exactly, so the result does not depend on the mesh the leaf lives on.
    return jnp.sum(_leaf_bits(x), dtype=jnp.uint32)


def fingerprint(tree: Any) -> list[int]:
    """One uint32 checksum (wrapping sum of raw bits) per array leaf of ``tree``."""
    leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, (jax.Array, np.ndarray))]
    # One leaf at a time: with leaves sharded over several processes, many checksums in flight
    # at once deadlocked a two-process CPU run in its collectives. Scalars: every process holds
    # the full value.
    return [int(np.asarray(_leaf_checksum(x).addressable_data(0))) for x in leaves]


class Checkpointer:
    """Saves and restores ``(state pytree, host JSON dict)`` pairs under ``config.directory``."""

    def __init__(self, config: CheckpointConfig):
        self.config = config
        url = "://" in config.directory
        self.directory = epath.Path(config.directory if url else os.path.abspath(config.directory))
        keep: list[Any] = [policies.LatestN(config.keep_last)]
        if config.keep_every:
            keep.append(policies.EveryNSteps(config.keep_every))
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "host": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policies.AnyPreservationPolicy(keep),
                enable_async_checkpointing=config.async_save,
                create=True,
            ),
        )
        self._last_save = time.monotonic()

    # -- saving --------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """Whether ``step`` is due for a checkpoint; the same answer on every process.

        The step rule is deterministic; the clock rule is decided on process 0 and broadcast.
        """
        c = self.config
        due = bool(c.save_every_steps) and step % c.save_every_steps == 0
        if c.save_every_minutes:
            late = time.monotonic() - self._last_save >= 60 * c.save_every_minutes
            due = bool(distributed.broadcast_host_object(due or late))
        return due

    def maybe_save(self, step: int, state: Any, host: dict[str, Any] | None = None) -> bool:
        """Save if ``should_save(step)``; returns whether a save was started."""
        return self.should_save(step) and self.save(step, state, host)

    def save(self, step: int, state: Any, host: dict[str, Any] | None = None) -> bool:
        """Start saving ``state`` and ``host`` as ``step`` (async if configured); returns True.

        ``host`` must be JSON-serialisable (checked now, before anything is written); process
        0's copy is the one written. Returns once the arrays are copied off the devices, so
        ``state`` may be donated afterwards.
        """
        host = {} if host is None else host
        json.dumps(host)  # fail fast, on the caller's stack, for non-JSON host state
        self._move_aside_if_exists(step)
        meta = {"format": _FORMAT, "step": step, "fingerprint": fingerprint(state)}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            host=ocp.args.JsonSave(host),
            meta=ocp.args.JsonSave(meta),
        ), force=True)
        self._last_save = time.monotonic()
        return True

    def _move_aside_if_exists(self, step: int) -> None:
        path = self.directory / str(step)
        # Decided on process 0 so that every process takes the same branch (and barrier).
        if not distributed.broadcast_host_object(path.exists()):
            return
        self._manager.wait_until_finished()
        aside = path.with_name(f"{step}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        if distributed.is_primary():
            logger.warning("checkpoint step %d already exists in %s; moving it to %s", step,
                           self.directory, aside.name)
            path.rename(aside)
        distributed.sync(f"fst_checkpoint_move_aside_{step}")
        self._manager.reload()

    # -- restoring -----------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Step numbers present on disk (valid or not), ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def restore(self, target: Any, step: int | None = None) -> Restored | None:
        """Restore onto ``target``, a pytree of ``jax.ShapeDtypeStruct`` with shardings (see
        ``abstract_target``) or of arrays whose shardings are reused; any mesh shape works.

        With ``step=None`` the newest valid step is restored, skipping (with a warning) broken
        ones; returns None if there is none (a fresh start). An explicit ``step`` that is
        missing or broken raises ``ValueError``.
        """
        self.wait()
        if any(isinstance(x, jax.Array) for x in jax.tree.leaves(target)):
            target = abstract_target(target)
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise ValueError(f"checkpoint step {step} not found in {self.directory}")
            restored, reason = self._try_restore(step, target)
            if restored is None:
                raise ValueError(
                    f"checkpoint step {step} in {self.directory} is unusable: {reason}")
            return restored
        if not steps:
            logger.info("no checkpoint in %s: starting fresh", self.directory)
            return None
        for candidate in reversed(steps):
            restored, reason = self._try_restore(candidate, target)
            if restored is not None:
                logger.info("restored checkpoint step %d from %s", candidate, self.directory)
                return restored
            logger.warning("checkpoint step %d in %s is unusable (%s); trying an earlier step",
                           candidate, self.directory, reason)
        logger.warning("no valid checkpoint among steps %s in %s: starting fresh", steps,
                       self.directory)
        return None

    def _try_restore(self, step: int, target: Any) -> tuple[Restored | None, str]:
        """The restored step, or None and why not. All processes reach the same verdict."""
        restored, reason = None, ""
        try:
            restored = self._read(step, target)
        except _Broken as e:
            reason = str(e)
        if not distributed.all_processes_agree(not reason):
            return None, reason or "unreadable on another process"
        return restored, ""

    def _read(self, step: int, target: Any) -> Restored:
        """Read ``step`` onto ``target``. Raises ``_Broken(reason)`` for a damaged or incomplete
        step and ``ValueError`` if the step is intact but holds other shapes than ``target``."""
        if not (self.directory / str(step) / COMMIT_MARKER).exists():
            raise _Broken(f"no {COMMIT_MARKER}: the save never committed")
        try:
            saved = self._manager.item_metadata(step)["state"].tree
        except Exception as e:  # noqa: BLE001 -- orbax/tensorstore/json raise many types
            raise _Broken(_describe(e)) from e
        mismatch = _mismatch(_signature(saved), _signature(target))
        if mismatch:  # not damage: the caller built another model or optimizer than was saved
            raise ValueError(f"checkpoint step {step} in {self.directory} does not fit the "
                             f"target state: {mismatch}")
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                host=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ))
        except Exception as e:  # noqa: BLE001
            raise _Broken(_describe(e)) from e
        problem = _check(step, out.state, out.host, out.meta)
        if problem:
            raise _Broken(problem)
        return Restored(step, out.state, out.host)

    # -- lifecycle -----------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until any in-flight async save has committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release resources."""
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _describe(error: Exception) -> str:
    first_line = str(error).splitlines()[0][:300] if str(error) else ""
    return f"{type(error).__name__}: {first_line}"


class _Broken(Exception):
    """A checkpoint step that is damaged or was never completely written."""


def _mismatch(saved: list, target: list) -> str:
    """'' if the two (shape, dtype) lists are equal, else a short account of the difference."""
    only_saved = list((Counter(saved) - Counter(target)).elements())
    only_target = list((Counter(target) - Counter(saved)).elements())
    if not (only_saved or only_target):
        return ""
    return (f"{len(saved)} saved vs {len(target)} target arrays; only saved: "
            f"{only_saved[:4]}; only in target: {only_target[:4]}")


def _signature(tree: Any) -> list[tuple[tuple[int, ...], str]]:
    """Sorted (shape, dtype) of the array leaves of a target or of saved orbax metadata."""
    def one(x):
        if isinstance(x, ocp.metadata.ScalarMetadata) or not hasattr(x, "shape"):
            return None  # Python scalars: nothing to check
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):  # saved as its key data
            x = jax.eval_shape(jax.random.key_data, x)
        return tuple(x.shape), np.dtype(x.dtype).name
    return sorted(sig for sig in map(one, jax.tree.leaves(tree)) if sig is not None)


def _check(step: int, state: Any, host: Any, meta: Any) -> str:
    """Why a read-back step is not trustworthy ('' if it is)."""
    if not isinstance(host, dict):
        return f"host state is {type(host).__name__}, not a JSON object"
    if (not isinstance(meta, dict) or meta.get("format") != _FORMAT or meta.get("step") != step
            or "fingerprint" not in meta):
        return "checkpoint metadata is missing or malformed"
    if fingerprint(state) != meta["fingerprint"]:
        return "array data does not match the fingerprint written at save time"
    return ""
