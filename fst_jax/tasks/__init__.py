"""Tasks with verifiable rewards and text feedback; importing this registers the built-in ones.

reasoning-gym itself is imported only when an ``rg:`` task is built."""

from fst_jax.tasks.base import (DEFAULT_SEED_CONTEXT, TASK_FAMILIES, TASKS, Example, Task, by_id, make_task,
                                register_task, register_task_family, safe_reward)
from fst_jax.tasks import arithmetic, codeio, datasets, reasoning_gym  # noqa: F401  (register the built-in tasks)

__all__ = ["DEFAULT_SEED_CONTEXT", "TASKS", "TASK_FAMILIES", "Example", "Task", "by_id", "make_task",
           "register_task", "register_task_family", "safe_reward"]
