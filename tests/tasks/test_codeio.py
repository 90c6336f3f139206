"""Our CodeIO task: seeded programs of several shapes, sandboxed ground truth, execution feedback."""

import pytest

from fst_jax.config import ConfigError
from fst_jax.tasks import make_task
from fst_jax.tasks.codeio import SHAPES

TASK = make_task("codeio")
TRAIN = TASK.examples("train", 40, seed=0)


def test_programs_are_deterministic_per_seed_and_splits_are_disjoint():
    again = TASK.examples("train", 40, seed=0)
    assert [(e.prompt, e.answer) for e in again] == [(e.prompt, e.answer) for e in TRAIN]
    test = {e.prompt for s in (0, 1) for e in TASK.examples("test", 30, seed=s)}
    train = {e.prompt for e in TRAIN} | {e.prompt for e in TASK.examples("train", 30, seed=1)}
    assert not train & test


def test_every_shape_appears_and_some_programs_raise():
    assert {e.metadata["shape"] for e in TRAIN} == set(SHAPES)
    raising = [e for e in TRAIN if "error_message" in e.metadata]
    assert raising and all(e.answer.endswith("Error") and e.metadata["error_line"] for e in raising)


def test_ground_truth_is_what_the_program_returns():
    for ex in TRAIN:
        if "error_message" not in ex.metadata:
            scope = {}
            exec(ex.metadata["program"], scope)  # our own templates: safe to run here
            assert repr(scope["result"]) == ex.answer


def test_value_answers_compare_as_python_values():
    ex = next(e for e in TRAIN if e.answer.startswith("["))
    spaced = ex.answer.replace(", ", " ,  ").replace("'", '"')
    assert TASK.reward(ex, f"<answer>{spaced}</answer>")[0] == 1.0
    score, feedback = TASK.reward(ex, "<answer>[]</answer>" if ex.answer != "[]" else "<answer>[0]</answer>")
    assert score == 0.0 and f"result = {ex.answer}" in feedback


def test_raising_program_feedback_gives_exception_message_and_line():
    ex = next(e for e in TRAIN if e.answer == "ZeroDivisionError")
    score, feedback = TASK.reward(ex, "<answer>3</answer>")
    line = ex.metadata["error_line"]
    assert score == 0.0
    assert f"raises ZeroDivisionError: {ex.metadata['error_message']} at line {line}" in feedback
    assert ex.metadata["program"].splitlines()[line - 1].strip() in feedback
    assert TASK.reward(ex, "It raises <answer>ZeroDivisionError</answer>")[0] == 1.0


def test_non_literal_answer_is_explained():
    ex = next(e for e in TRAIN if "error_message" not in e.metadata)
    score, feedback = TASK.reward(ex, "<answer>it loops forever</answer>")
    assert score == 0.0 and "not a Python literal" in feedback and ex.answer in feedback


def test_shapes_option_restricts_programs_and_rejects_unknown_ones():
    only = make_task("codeio", shapes=["division"])
    assert {e.metadata["shape"] for e in only.examples("train", 5)} == {"division"}
    with pytest.raises(ConfigError):
        make_task("codeio", shapes=["nope"])
