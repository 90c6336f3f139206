"""The arithmetic task: seeded problems, answer parsing, reward and feedback; safe_reward."""

import pytest

from fst_jax.config import ConfigError
from fst_jax.tasks import TASKS, Example, make_task, safe_reward
from fst_jax.tasks.arithmetic import ArithmeticTask, parse_answer

EX = Example("e0", "Mia has 17 marbles. Her friend gives her 25 more. How many marbles does Mia have now?", "42",
             {"a": 17, "b": 25, "op": "+", "expression": "17 + 25"})


def test_examples_are_seeded_unique_and_correct():
    task = make_task("arithmetic")
    a, b = task.examples("train", 50, seed=3), task.examples("train", 50, seed=3)
    assert a == b
    assert a != task.examples("train", 50, seed=4) and a != task.examples("test", 50, seed=3)
    assert len({e.id for e in a}) == 50
    ops = {e.metadata["op"] for e in a}
    assert ops == {"+", "-", "*"}
    for e in a:
        x, y = e.metadata["a"], e.metadata["b"]
        assert int(e.answer) == {"+": x + y, "-": x - y, "*": x * y}[e.metadata["op"]] >= 0
        assert str(x) in e.prompt and str(y) in e.prompt


@pytest.mark.parametrize("train_n, test_n", [(256, 64), (1024, 64), (9600, 256)])  # quickstart, defaults, pod
def test_test_prompts_never_occur_in_train_at_the_configured_pool_sizes(train_n, test_n):
    task = make_task("arithmetic")
    train = task.examples("train", train_n, seed=0)
    test = task.examples("test", test_n, seed=0)
    assert (len(train), len(test)) == (train_n, test_n)
    train_prompts = {e.prompt for e in train}
    overlap = sum(e.prompt in train_prompts for e in test) / test_n
    assert overlap == 0.0


def test_split_that_cannot_provide_examples_raises():
    with pytest.raises(ValueError, match="test"):
        make_task("arithmetic", test_fraction=1e-12).examples("test", 1)


@pytest.mark.parametrize("text, value, marked", [
    ("so #### 42", 42.0, True),
    ("The answer is 42.", 42.0, True),
    ("17 + 25 = 42", 42.0, False),
    ("#### 1,234", 1234.0, True),
    ("I got 7 then #### 9 but the answer is 8", 9.0, True),
    ("no digits here", None, False),
])
def test_parse_answer_prefers_marked_numbers(text, value, marked):
    assert parse_answer(text) == (value, marked)


def test_reward_correct_marked_answer_scores_one():
    assert make_task("arithmetic").reward(EX, "17 + 25 = 42\n#### 42") == (1.0, "Correct: the answer is 42 (17 + 25).")


def test_reward_wrong_value_names_both_answers_and_expression():
    score, feedback = make_task("arithmetic").reward(EX, "#### 41")
    assert score == 0.0
    assert feedback == "You answered 41 but the correct answer is 42 (17 + 25)."


def test_reward_unmarked_answer_is_accepted_with_format_feedback():
    score, feedback = make_task("arithmetic").reward(EX, "I think 42")
    assert score == 1.0 and "wrong format" in feedback and "#### 42" in feedback


def test_reward_unmarked_wrong_answer_mentions_format():
    score, feedback = make_task("arithmetic").reward(EX, "maybe 40")
    assert score == 0.0 and "You answered 40" in feedback and "####" in feedback


def test_reward_without_number_says_so():
    score, feedback = make_task("arithmetic").reward(EX, "I don't know")
    assert score == 0.0 and feedback.startswith("No number found") and "42 (17 + 25)" in feedback


class _Broken:
    name = "broken"

    def reward(self, example, completion):
        raise ZeroDivisionError("boom")


class _OutOfRange:
    name = "bad"

    def reward(self, example, completion):
        return 1.5, "too good"


def test_safe_reward_turns_exceptions_into_zero_with_named_error(caplog):
    score, feedback = safe_reward(_Broken(), EX, "x")
    assert score == 0.0 and "ZeroDivisionError: boom" in feedback
    assert "ZeroDivisionError" in caplog.text


def test_safe_reward_rejects_scores_outside_unit_interval():
    assert safe_reward(_OutOfRange(), EX, "x")[0] == 0.0


def test_unknown_task_name_lists_registered_ones():
    assert "arithmetic" in TASKS
    with pytest.raises(ConfigError, match="arithmetic"):
        make_task("nope")


def test_test_split_problems_are_distinct_and_train_split_stays_a_stream():
    task = ArithmeticTask()
    test = [e.prompt for e in task.examples("test", 256)]
    assert len(set(test)) == 256  # each validation problem counts once in the statistics
    train = [e.prompt for e in task.examples("train", 9600)]
    assert len(train) == 9600 and not set(train) & set(test)


def test_operators_restrict_the_problems_and_unknown_ones_are_refused():
    ops = {e.metadata["op"] for e in ArithmeticTask(operators=["+", "-"]).examples("test", 200)}
    assert ops == {"+", "-"}
    with pytest.raises(ConfigError, match="operators"):
        ArithmeticTask(operators=["/"])
