"""The reasoning-gym adapter: seeded disjoint splits, 0/1 scores, feedback with task detail."""

import json

import pytest

from fst_jax.config import ConfigError
from fst_jax.tasks import make_task

LISTED = ["rg:codeio", "rg:path_star", "rg:knights_knaves", "rg:family_relationships", "rg:gsm_symbolic",
          "rg:basic_arithmetic"]


@pytest.mark.parametrize("name", LISTED)
def test_examples_are_deterministic_per_seed_and_splits_are_disjoint(name):
    task = make_task(name)
    a, b = task.examples("train", 6, seed=3), task.examples("train", 6, seed=3)
    assert [(e.id, e.prompt, e.answer) for e in a] == [(e.id, e.prompt, e.answer) for e in b]
    assert [e.prompt for e in task.examples("train", 6, seed=4)] != [e.prompt for e in a]
    train = {e.prompt for s in (0, 1) for e in task.examples("train", 12, seed=s)}
    test = {e.prompt for s in (0, 1) for e in task.examples("test", 12, seed=s)}
    assert train and test and not train & test


@pytest.mark.parametrize("name", LISTED)
def test_right_answer_scores_one_and_wrong_scores_zero_with_the_answer_in_feedback(name):
    task = make_task(name)
    ex = task.examples("test", 1, seed=0)[0]
    assert task.reward(ex, f"Let me think.\n<answer>{ex.answer}</answer>")[0] == 1.0
    score, feedback = task.reward(ex, "<answer>zzz wrong</answer>")
    assert score == 0.0 and ex.answer.rstrip(".") in feedback


def test_unmarked_right_answer_scores_but_feedback_asks_for_tags():
    task = make_task("rg:basic_arithmetic")
    ex = task.examples("train", 1)[0]
    score, feedback = task.reward(ex, f"so it is\n{ex.answer}")
    assert score == 1.0 and "<answer>" in feedback


def test_empty_reply_is_unparseable():
    task = make_task("rg:basic_arithmetic")
    ex = task.examples("train", 1)[0]
    assert task.reward(ex, "")[1].startswith("No answer found")


def test_path_star_feedback_names_the_first_step_that_is_not_an_edge():
    task = make_task("rg:path_star")
    ex = task.examples("test", 1)[0]
    nodes = ex.answer.split()
    score, feedback = task.reward(ex, f"<answer>{nodes[0]} {nodes[1]} 999999 {nodes[-1]}</answer>")
    assert score == 0.0 and f"Step 2 ({nodes[1]} -> 999999) is not an edge" in feedback
    assert "start node" in task.reward(ex, f"<answer>{' '.join(nodes[1:])}</answer>")[1]


def test_knights_knaves_feedback_names_the_person_labelled_wrongly():
    task = make_task("rg:knights_knaves", n_people=3)
    ex = task.examples("test", 1)[0]
    names = [str(n) for n in ex.metadata["entry"]["metadata"]["names"]]
    score, feedback = task.reward(ex, f"<answer>{_labels(ex, flip_last=True)}</answer>")
    assert score == 0.0 and f"Labelled wrongly: {names[-1]} is" in feedback
    assert all(n not in feedback.split("Labelled wrongly:")[1].split(".")[0] for n in names[:-1])


def test_codeio_asks_for_the_output_and_feedback_gives_the_expected_value_and_diff():
    task = make_task("rg:codeio")
    ex = task.examples("test", 1)[0]
    assert "predict the output" in ex.prompt
    value = json.loads(ex.answer)
    wrong = {"a_key_nobody_uses": 1} if not isinstance(value, dict) else {k: "x" for k in value}
    score, feedback = task.reward(ex, f"<answer>{json.dumps(wrong)}</answer>")
    assert score == 0.0 and ex.answer in feedback and ("Differences:" in feedback or "you gave" in feedback)
    assert "not valid JSON" in task.reward(ex, "<answer>{nope</answer>")[1]


def _labels(ex, flip_last: bool) -> str:
    meta = ex.metadata["entry"]["metadata"]
    terms, truth = meta["knight_knave_terms"], list(meta["solution"])
    if flip_last:
        truth[-1] = not truth[-1]
    return ", and ".join(f"{n} is {terms['a_knight'] if t else terms['a_knave']}" for n, t in zip(meta["names"], truth))


def test_partial_credit_option_keeps_the_generators_fraction():
    binary, partial = make_task("rg:knights_knaves", n_people=3), make_task("rg:knights_knaves", n_people=3, partial_credit=True)
    ex = binary.examples("train", 1)[0]
    one_wrong = f"<answer>{_labels(ex, flip_last=True)}</answer>"
    assert binary.reward(ex, one_wrong)[0] == 0.0
    assert 0.0 < partial.reward(ex, one_wrong)[0] < 1.0
    assert binary.reward(ex, f"<answer>{_labels(ex, flip_last=False)}</answer>")[0] == 1.0


def test_generator_options_pass_through_and_bad_ones_raise():
    ex = make_task("rg:path_star", degree=5).examples("train", 1)[0]
    edges = ex.prompt.strip().splitlines()[-1].split("/")[0]
    assert edges.count("|") == 5 * ex.metadata["entry"]["metadata"]["path_length"]
    with pytest.raises(ConfigError):
        make_task("rg:path_star", no_such_option=1)
    with pytest.raises(ConfigError):
        make_task("rg:path_star", seed=3)


def test_codeio_full_credit_is_json_equality_whatever_the_spacing():
    task = make_task("rg:codeio")
    ex = task.examples("train", 1)[0]
    respaced = json.dumps(json.loads(ex.answer), indent=2)
    assert task.reward(ex, f"<answer>{respaced}</answer>")[0] == 1.0
