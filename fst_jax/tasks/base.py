"""The Task protocol (examples with verifiable rewards and text feedback) and its registry.

A task hands out ``Example`` rows and scores a completion with ``reward(example, completion)
-> (score in [0, 1], feedback text)``. The feedback is what the fast channel (GEPA) reads, so it
should say what the right answer was and what went wrong. ``safe_reward`` wraps any task's
reward so that a raising or out-of-range reward gives score 0 and a feedback naming the error.

Every task also carries two context strings, both overridable by ``make_task`` options:
``seed_context`` (a task-agnostic default seed for GEPA; ``DEFAULT_SEED_CONTEXT`` unless set) and
``original_prompt`` (the task's own fixed instruction, what ``mode: rl`` uses as its context).
Names are plain (``"arithmetic"``) or ``family:member`` (``"rg:codeio"``): a family registered in
``TASK_FAMILIES`` builds any member, ``make_task("rg:maze")`` as well as the listed ones.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
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


DEFAULT_SEED_CONTEXT = (
    "You are a careful problem solver. Think through the problem step by step, "
    "then state your final answer clearly at the end."
)


class Task(Protocol):
    """What the RL and GEPA loops need from a task: examples, a reward, and the two contexts."""

    name: str
    seed_context: str
    original_prompt: str

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """``n`` examples of ``split`` ("train" or "test"); the same arguments give the same list."""
        ...

    def reward(self, example: Example, completion: str) -> tuple[float, str]:
        """Score in [0, 1] and a feedback text for one completion."""
        ...


TASKS: dict[str, Callable[..., Task]] = {}
# family prefix -> factory(member, **options): "rg" builds "rg:<generator>".
TASK_FAMILIES: dict[str, Callable[..., Task]] = {}

# Decorators registering a task factory (usually the class) under a name, or a family by prefix.
register_task = functools.partial(register, TASKS)
register_task_family = functools.partial(register, TASK_FAMILIES)


def make_task(name: str, **kwargs: Any) -> Task:
    """Build a task by registered name or ``family:member`` (ConfigError naming the choices if
    unknown); ``kwargs`` are the task's options, ``seed_context``/``original_prompt`` included."""
    if name not in TASKS and ":" in name:
        family, member = name.split(":", 1)
        if family in TASK_FAMILIES:
            return TASK_FAMILIES[family](member, **kwargs)
    require_in_registry(name, TASKS, f"task (families: {sorted(f + ':*' for f in TASK_FAMILIES)})")
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


def in_test_split(text: str, test_fraction: float) -> bool:
    """Whether a problem with this text belongs to the test split: the SHA-256 of the text, read
    as a fraction of 2**64, falls below ``test_fraction``. Equal texts always land in the same
    split, so splits built this way never overlap."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < test_fraction


def by_id(examples: Sequence[Example]) -> dict[str, Example]:
    """Index examples by id; raises ValueError on duplicate ids."""
    out: dict[str, Example] = {}
    for ex in examples:
        if ex.id in out:
            raise ValueError(f"duplicate example id {ex.id!r}")
        out[ex.id] = ex
    return out
