"""The shared final-answer extraction rule."""

from fst_jax.tasks.answers import extract_answer


def test_answer_tags_win_over_everything_else_and_the_last_one_counts():
    got = extract_answer("#### 3\n<answer>1</answer> then <answer> 2 </answer>\n\\boxed{9}")
    assert (got.text, got.marked) == ("2", True)


def test_boxed_answer_keeps_nested_braces():
    assert extract_answer("so \\boxed{\\frac{1}{2}} done").text == "\\frac{1}{2}"


def test_hash_marker_and_answer_phrase_are_marked():
    assert extract_answer("work\n#### 42\n").text == "42"
    got = extract_answer("The final answer is **17**.")
    assert (got.text, got.marked) == ("17", True)


def test_unmarked_reply_falls_back_to_last_non_empty_line():
    got = extract_answer("thinking...\n  7 3 5.\n\n")
    assert (got.text, got.marked) == ("7 3 5", False)


def test_empty_reply_has_no_answer():
    assert extract_answer("  \n ").text is None
