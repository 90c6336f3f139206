"""Every registered task carries a task-agnostic seed context and its own original prompt."""

import pytest

from fst_jax.config import ConfigError
from fst_jax.tasks import DEFAULT_SEED_CONTEXT, TASKS, make_task

NEEDS_DATA = {"jsonl", "tfds"}


@pytest.mark.parametrize("name", sorted(set(TASKS) - NEEDS_DATA))
def test_every_task_has_default_seed_context_and_a_distinct_original_prompt(name):
    task = make_task(name)
    assert task.seed_context == DEFAULT_SEED_CONTEXT
    assert isinstance(task.original_prompt, str) and task.original_prompt not in ("", DEFAULT_SEED_CONTEXT)


@pytest.mark.parametrize("name", ["arithmetic", "codeio", "rg:path_star"])
def test_contexts_are_set_from_task_options(name):
    task = make_task(name, seed_context="seed!", original_prompt="orig!")
    assert (task.seed_context, task.original_prompt) == ("seed!", "orig!")


def test_family_name_builds_an_unlisted_reasoning_gym_generator():
    task = make_task("rg:maze")
    assert task.name == "rg:maze" and len(task.examples("train", 2)) == 2


def test_unknown_names_raise_config_errors_naming_the_choices():
    with pytest.raises(ConfigError, match="rg:\\*"):
        make_task("nope:thing")
    with pytest.raises(ConfigError, match="unknown reasoning-gym generator"):
        make_task("rg:not_a_generator")
