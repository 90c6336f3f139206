"""Scoring a batch of completions: in-process, or in a process pool with a per-call timeout.

``RewardPool(task, RewardConfig(workers, timeout_s)).score(examples, completions)`` returns one
``(score, feedback)`` per completion, in order, with ``safe_reward``'s contract: it never raises
for a reward's behaviour; a crash, an invalid score or a timeout gives 0.0 and a feedback naming
the cause, and the rest of the batch goes on. With ``workers = 0`` rewards run serially in this
process (no timeout can be enforced there: nothing to kill; tests and tiny runs). With
``workers > 0`` each call runs in a ``pebble.ProcessPool`` worker (a process, so CPU-bound
rewards run in parallel and a hanging one can be killed); a call running past ``timeout_s`` (from
when a worker starts it) has its worker killed and replaced. pebble is used rather than
``concurrent.futures``, whose pools cannot kill one stuck worker. The task is pickled once into
each worker; a task that cannot be pickled is rejected when the pool is built.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import pickle
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Literal, Protocol, Sequence

from fst_jax.config import require
from fst_jax.tasks.base import Example, Task, safe_reward

log = logging.getLogger(__name__)


class Scorer(Protocol):
    """Scores completions of ``task`` in batches, ``(score, feedback)`` per pair in order, with
    ``safe_reward``'s contract (``RewardPool`` is one)."""

    task: Task

    def score(self, examples: Sequence[Example], completions: Sequence[str]) -> list[tuple[float, str]]: ...


@dataclasses.dataclass(frozen=True)
class FunctionScorer:
    """A ``Scorer`` from a task and a scoring function with ``RewardPool.score``'s signature (the
    training loop's: a pool's ``score`` with each process scoring its share of the rows)."""

    task: Task
    score: Callable[[Sequence[Example], Sequence[str]], list[tuple[float, str]]]


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """``workers``: processes scoring in parallel (0 = serially in-process, no timeout);
    ``timeout_s``: wall seconds one reward call may run in a worker; ``start_method``: how workers
    start (``forkserver`` avoids forking a process that runs JAX threads)."""

    workers: int = 0
    timeout_s: float = 10.0
    start_method: Literal["forkserver", "spawn", "fork"] = "forkserver"

    def __post_init__(self):
        require(self.workers >= 0, "workers must be >= 0 (0 = score in-process)")
        require(self.timeout_s > 0, "timeout_s must be positive")


_WORKER_TASK: Task | None = None


def _init_worker(task_bytes: bytes) -> None:
    global _WORKER_TASK
    _WORKER_TASK = pickle.loads(task_bytes)


def _worker_ready() -> bool:
    return _WORKER_TASK is not None


def _score_in_worker(example: Example, completion: str) -> tuple[float, str]:
    return safe_reward(_WORKER_TASK, example, completion)


class RewardPool:
    """Scores completions of one task (see the module doc). Close it, or use it as a context
    manager, to stop its workers."""

    def __init__(self, task: Task, config: RewardConfig = RewardConfig()):
        self.task, self.config = task, config
        self._pool = None
        if config.workers > 0:
            import pebble

            try:
                task_bytes = pickle.dumps(task)
            except Exception as e:
                raise TypeError(f"task {getattr(task, 'name', task)!r} cannot be pickled for reward workers "
                                f"({type(e).__name__}: {e}); use workers=0") from None
            self._pool = pebble.ProcessPool(max_workers=config.workers, initializer=_init_worker,
                                            initargs=(task_bytes,),
                                            context=multiprocessing.get_context(config.start_method))
            try:  # start the workers now: a task they cannot load fails here, not as zero rewards
                self._pool.schedule(_worker_ready).result(timeout=max(60.0, config.timeout_s))
            except Exception as e:
                self.close()
                raise RuntimeError(
                    f"reward workers for task {getattr(task, 'name', task)!r} failed to start ({type(e).__name__}: {e}). "
                    f"The task must be importable by module name, and a script that builds a pool needs "
                    f"an `if __name__ == '__main__':` guard (start method {config.start_method!r})") from None

    def score(self, examples: Sequence[Example], completions: Sequence[str]) -> list[tuple[float, str]]:
        """``(score, feedback)`` for each (example, completion) pair, in order."""
        if len(examples) != len(completions):
            raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
        if self._pool is None:
            return [safe_reward(self.task, ex, c) for ex, c in zip(examples, completions)]
        try:
            futures = [self._pool.schedule(_score_in_worker, args=(ex, c), timeout=self.config.timeout_s)
                       for ex, c in zip(examples, completions)]
        except RuntimeError as e:  # the pool itself broke (its manager died); nothing was scored
            log.error("reward pool broken: %s", e)
            return [(0.0, f"The reward pool failed ({e}); score set to 0.")] * len(examples)
        return [self._collect(f, ex) for f, ex in zip(futures, examples)]

    def _collect(self, future, example: Example) -> tuple[float, str]:
        from pebble import ProcessExpired

        try:
            return future.result()
        except FutureTimeout:
            log.warning("reward for example %s timed out after %s s", example.id, self.config.timeout_s)
            return 0.0, f"The reward timed out after {self.config.timeout_s:g} s; score set to 0."
        except ProcessExpired as e:
            log.warning("reward worker for example %s died (exit code %s)", example.id, e.exitcode)
            return 0.0, f"The reward process crashed (exit code {e.exitcode}); score set to 0."
        except Exception as e:  # e.g. an example or result that does not pickle
            log.warning("reward for example %s failed in the pool: %s: %s", example.id, type(e).__name__, e)
            return 0.0, f"The reward could not be computed ({type(e).__name__}: {e}); score set to 0."

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._pool is not None:
            self._pool.stop()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
