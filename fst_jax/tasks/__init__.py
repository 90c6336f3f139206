"""Tasks with verifiable rewards and text feedback; importing this registers the built-in ones."""

from fst_jax.tasks.base import TASKS, Example, Task, by_id, make_task, register_task, safe_reward
from fst_jax.tasks import arithmetic  # noqa: F401  (registers "arithmetic")

__all__ = ["TASKS", "Example", "Task", "by_id", "make_task", "register_task", "safe_reward"]
