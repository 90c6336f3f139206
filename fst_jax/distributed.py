"""Multi-process helpers: join a run, know who is primary, share host data, wait for everyone.

Every process runs the same program and the same jitted computations. Host-side decisions (the
fast loop's chosen contexts, whether to checkpoint now) are taken on process 0 and broadcast
with ``broadcast_host_object`` so that all processes act on identical data; a SIGTERM that
reaches some processes stops all of them at the same step (``StopSignal``).

``initialize`` reads its arguments from the environment when they are not given, so launch
scripts only set variables (see ``launch/README.md``):

- ``FST_COORDINATOR`` (``host:port``, or ``auto`` to let JAX detect TPU pods / Slurm / MPI),
- ``FST_NUM_PROCESSES`` and ``FST_PROCESS_ID``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from fst_jax.padding import pow2

logger = logging.getLogger(__name__)

_MIN_BUFFER = 256


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join a multi-process JAX run; call before any other JAX work. Returns True if joined.

    Missing arguments come from ``FST_COORDINATOR``, ``FST_NUM_PROCESSES``, ``FST_PROCESS_ID``.
    ``coordinator="auto"`` lets ``jax.distributed.initialize`` detect the cluster (TPU pod,
    Slurm, Open MPI). With no coordinator, or a single process, this is a no-op (returns False).
    Calling it again after a successful join is a no-op that returns True.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get("FST_COORDINATOR") or None
    if num_processes is None and os.environ.get("FST_NUM_PROCESSES"):
        num_processes = int(os.environ["FST_NUM_PROCESSES"])
    if process_id is None and os.environ.get("FST_PROCESS_ID"):
        process_id = int(os.environ["FST_PROCESS_ID"])
    if coordinator == "auto":
        jax.distributed.initialize()
    elif coordinator is None or num_processes in (None, 1):
        return False
    else:
        if process_id is None:
            raise ValueError("distributed.initialize: process_id (or FST_PROCESS_ID) is required")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    logger.info("joined distributed run: process %d of %d, %d local / %d global devices",
                jax.process_index(), jax.process_count(), jax.local_device_count(),
                jax.device_count())
    return True


def is_primary() -> bool:
    """True on process 0 (the one that runs the fast loop, logs and decides)."""
    return jax.process_index() == 0


def _padded(payload: bytes, size: int) -> np.ndarray:
    """``payload`` in a zero uint8 buffer of a power of two >= ``size`` bytes, so that varying
    payload sizes reuse a few compiled collectives."""
    buffer = np.zeros(max(_MIN_BUFFER, pow2(size)), np.uint8)
    buffer[:len(payload)] = np.frombuffer(payload, np.uint8)
    return buffer


def broadcast_host_object(obj: Any) -> Any:
    """Process 0's ``obj``, JSON round-tripped, on every process (other processes' ``obj`` is
    ignored). All processes must call it. Tuples come back as lists, as with ``json``."""
    if jax.process_count() == 1:
        return json.loads(json.dumps(obj))
    payload = json.dumps(obj).encode() if is_primary() else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
    buffer = np.asarray(multihost_utils.broadcast_one_to_all(_padded(payload, size)))
    return json.loads(buffer[:size].tobytes().decode())


def fetch(x: jax.Array) -> np.ndarray:
    """The whole value of ``x`` as a numpy array on every process, also when ``x`` is sharded
    over devices of several processes (then an all-gather: every process must call it)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_to_primary(tree: Any) -> Any:
    """``tree`` with each array leaf's whole value as a NumPy array on process 0 and ``None`` on
    the others. One leaf at a time (``fetch``: an all-gather when the leaf spans several
    processes), so besides the result at most one whole leaf is held at once. All processes must
    call it."""
    def one(x: jax.Array) -> np.ndarray | None:
        value = fetch(x)  # every process takes part, process 0 keeps it
        return value if is_primary() else None

    return jax.tree.map(one, tree)


def all_gather_host_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (JSON round-tripped), in process order, on every process. All
    processes must call it."""
    if jax.process_count() == 1:
        return [json.loads(json.dumps(obj))]
    payload = json.dumps(obj).encode()
    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(payload)], np.int32))).reshape(-1)
    buffers = np.asarray(multihost_utils.process_allgather(_padded(payload, int(sizes.max()))))
    return [json.loads(buffers[p, :sizes[p]].tobytes().decode()) for p in range(len(sizes))]


def scored_by_slices(score: Callable[[Sequence, Sequence[str]], list[tuple[float, str]]]):
    """``score(examples, completions) -> [(score, feedback)]`` where each process scores only
    its contiguous share of the rows (process ``i`` of ``P``: rows ``n*i//P`` to
    ``n*(i+1)//P``) and every process gets every row's result, in row order. All processes
    must call it with the same rows."""
    def run(examples: Sequence, completions: Sequence[str]) -> list[tuple[float, str]]:
        if jax.process_count() == 1:
            return score(examples, completions)
        n, P, i = len(examples), jax.process_count(), jax.process_index()
        lo, hi = n * i // P, n * (i + 1) // P
        mine = score(examples[lo:hi], completions[lo:hi])
        return [(float(s), str(f)) for part in all_gather_host_objects(mine) for s, f in part]

    return run


def same_examples(examples: Sequence, what: str) -> list:
    """The examples (``.id``, ``.prompt``, ``.answer``) at the positions where every process
    made the same one, in order; a warning names how many were dropped. A generator that is not
    deterministic across processes (reasoning-gym's ``codeio`` on about 1 item in 200) would
    otherwise give processes different prompts in one SPMD step. All processes must call it."""
    if jax.process_count() == 1:
        return list(examples)
    mine = [hashlib.sha256(json.dumps([e.id, e.prompt, e.answer]).encode()).hexdigest()[:16] for e in examples]
    everyone = all_gather_host_objects(mine)
    kept = [e for i, e in enumerate(examples) if all(i < len(d) and d[i] == mine[i] for d in everyone)]
    if len(kept) < len(examples):
        logger.warning("%s: %d of %d examples differ between processes and were dropped", what,
                       len(examples) - len(kept), len(examples))
    return kept


def all_processes_agree(flag: bool) -> bool:
    """True iff ``flag`` is True on every process (all processes must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    flags = multihost_utils.process_allgather(np.array([bool(flag)], np.int32))
    return bool(np.all(flags))


def any_process(flag: bool) -> bool:
    """True on every process iff ``flag`` is True on at least one (all processes must call it)."""
    return not all_processes_agree(not flag)


class StopSignal:
    """SIGTERM as a stop that every process takes at the same step.

    While installed (from construction to ``restore()``), SIGTERM only sets ``received`` on the
    process it reaches. ``agreed()`` is collective: every process must call it once per step at
    the same point; it is True on all processes iff any process has received SIGTERM (one small
    all-gather; single-process, the local flag). A loop that checkpoints and stops when it is
    True thus saves the same step everywhere."""

    def __init__(self):
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logger.warning("SIGTERM: finishing this step, saving a checkpoint, then stopping")
        self.received = True

    def agreed(self) -> bool:
        stop = any_process(self.received)
        if stop and not self.received:
            logger.warning("another process received SIGTERM: saving a checkpoint, then stopping")
        return stop

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def sync(name: str) -> None:
    """Barrier: return once every process has reached ``sync(name)`` (no-op single-process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
