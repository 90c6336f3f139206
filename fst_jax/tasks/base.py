"""The Task protocol (examples with verifiable rewards and text feedback) and its registry.

A task hands out ``Example`` rows and scores a completion with ``reward(example, completion)
-> (score in [0, 1], feedback text)``. The feedback is what the fast channel (GEPA) reads, so it
should say what the right answer was and what went wrong. ``safe_reward`` wraps any task's
reward so that a raising or out-of-range reward gives score 0 and a feedback naming the error.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable, Protocol, Sequence

from fst_jax.registry import register
from fst_jax.config import require_in_registry

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Example:
    """One problem: a unique ``id``, the user-message ``prompt``, the reference ``answer``."""

    id: str
    prompt: str
    answer: str
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


class Task(Protocol):
    """What the RL and GEPA loops need from a task."""

    name: str

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """``n`` examples of ``split`` ("train" or "test"); the same arguments give the same list."""
        ...

    def reward(self, example: Example, completion: str) -> tuple[float, str]:
        """Score in [0, 1] and a feedback text for one completion."""
        ...


TASKS: dict[str, Callable[..., Task]] = {}


# Decorator registering a task factory (usually the class) under a name.
register_task = functools.partial(register, TASKS)


def make_task(name: str, **kwargs: Any) -> Task:
    """Build a registered task by name (ConfigError listing the names if unknown)."""
    require_in_registry(name, TASKS, "task")
    return TASKS[name](**kwargs)


def safe_reward(task: Task, example: Example, completion: str) -> tuple[float, str]:
    """``task.reward`` that never raises: errors and bad scores give 0 and a feedback naming them."""
    try:
        score, feedback = task.reward(example, completion)
        score = float(score)
    except Exception as e:  # a reward bug must not stop training
        log.warning("reward for example %s raised %s: %s", example.id, type(e).__name__, e)
        return 0.0, f"The reward function failed ({type(e).__name__}: {e}); score set to 0."
    if not math.isfinite(score) or not 0.0 <= score <= 1.0:
        log.warning("reward for example %s returned %r, outside [0, 1]", example.id, score)
        return 0.0, f"The reward function returned an invalid score {score!r}; score set to 0."
    return score, str(feedback)


def by_id(examples: Sequence[Example]) -> dict[str, Example]:
    """Index examples by id; raises ValueError on duplicate ids."""
    out: dict[str, Example] = {}
    for ex in examples:
        if ex.id in out:
            raise ValueError(f"duplicate example id {ex.id!r}")
        out[ex.id] = ex
    return out
