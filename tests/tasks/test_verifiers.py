"""Verifiers by name, each on known right and wrong answers."""

import pytest

from fst_jax.config import ConfigError
from fst_jax.tasks.verifiers import verify

CASES = [
    ("exact", " Paris ", "Paris", "paris"),
    ("normalized", "the Eiffel-Tower!", "Eiffel tower", "Eiffel towers"),
    ("numeric", "$1,234.0", "1234", "1235"),
    ("numeric", "3/4", "0.75", "0.76"),
    ("math", "\\frac{1}{2}", "0.5", "\\frac{1}{3}"),
    ("math", "2\\sqrt{2}", "\\sqrt{8}", "\\sqrt{6}"),
    ("json", '{"b": [1, 2], "a": 1}', '{"a": 1, "b": [1, 2]}', '{"a": 1, "b": [2, 1]}'),
    ("regex", "ID-0042", r"ID-\d{4}", "ID-42"),
]


@pytest.mark.parametrize("name,right,reference,wrong", CASES)
def test_verifier_accepts_right_and_rejects_wrong(name, right, reference, wrong):
    assert verify(name, right, reference).correct
    verdict = verify(name, wrong, reference)
    assert not verdict.correct and verdict.detail


def test_numeric_tolerance_is_an_option():
    assert not verify("numeric", "100.5", "100").correct
    assert verify("numeric", "100.5", "100", rel_tol=0.01).correct


def test_json_detail_names_the_differing_field():
    assert "['b']" in verify("json", '{"a": 1, "b": 3}', '{"a": 1, "b": 2}').detail
    assert "not valid JSON" in verify("json", "{a: 1}", '{"a": 1}').detail


def test_regex_search_and_case_options():
    assert verify("regex", "answer: YES", "yes", search=True, ignore_case=True).correct
    assert not verify("regex", "answer: YES", "yes").correct


def test_unknown_verifier_is_a_config_error():
    with pytest.raises(ConfigError, match="regex"):
        verify("fuzzy", "a", "a")
