"""Name registries: plain dicts filled by decorators; configs validate names against them."""

from __future__ import annotations

from typing import Any, Callable


def register(registry: dict[str, Any], name: str) -> Callable[[Any], Any]:
    """Decorator that stores the decorated object as ``registry[name]`` and returns it unchanged.
    Modules bind it per registry, e.g. ``register_task = functools.partial(register, TASKS)``."""

    def wrap(obj: Any) -> Any:
        registry[name] = obj
        return obj

    return wrap
