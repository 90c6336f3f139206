"""Answer verifiers by name: ``verify(name, predicted, reference, **options) -> Verdict``.

``predicted`` is the answer already extracted from a completion (``fst_jax.tasks.answers``);
``reference`` the dataset's answer. Registered:
- ``exact``: equal after stripping surrounding whitespace;
- ``normalized``: equal after NFKC, lower case, punctuation and the articles a/an/the removed,
  whitespace collapsed (SQuAD-style);
- ``numeric``: both parse as numbers (commas, ``$``, ``%`` ignored; ``3/4`` allowed) and agree
  within ``rel_tol`` (1e-6) or ``abs_tol`` (1e-9);
- ``math``: mathematical equivalence by ``math-verify`` (LaTeX or plain expressions; a bare
  answer is read as LaTeX inside ``$...$`` first, then as a plain expression);
- ``json``: equal as parsed JSON values (key order and spacing do not matter);
- ``regex``: ``reference`` is a regular expression that must match the whole answer
  (``search=True``: anywhere; ``ignore_case=True``).
The verdict's ``detail`` says what was wrong, for the feedback text.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import string
import unicodedata
from fractions import Fraction
from typing import Any, Callable

from fst_jax.config import require_in_registry
from fst_jax.registry import register


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether the answer is right, and a sentence on what was wrong (empty when right)."""

    correct: bool
    detail: str = ""


VERIFIERS: dict[str, Callable[..., Verdict]] = {}
register_verifier = functools.partial(register, VERIFIERS)


def verify(name: str, predicted: str, reference: str, **options: Any) -> Verdict:
    """Run the verifier ``name`` (ConfigError listing the names if unknown)."""
    require_in_registry(name, VERIFIERS, "verifier")
    return VERIFIERS[name](predicted, reference, **options)


@register_verifier("exact")
def exact(predicted: str, reference: str) -> Verdict:
    return Verdict(True) if predicted.strip() == reference.strip() else Verdict(False, "The answer does not match exactly.")


def normalize_text(text: str) -> str:
    """NFKC, lower case, no punctuation, no articles, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if ch in string.punctuation else ch for ch in text)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


@register_verifier("normalized")
def normalized(predicted: str, reference: str) -> Verdict:
    if normalize_text(predicted) == normalize_text(reference):
        return Verdict(True)
    return Verdict(False, "The answer differs from the reference even ignoring case, punctuation and articles.")


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?")


def parse_number(text: str) -> float | None:
    """The last number in ``text`` (``1,234``, ``$5``, ``12%``, ``3/4``, ``1e-3``), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    if not found:
        return None
    try:
        return float(Fraction(found[-1].replace(" ", "")))
    except (ValueError, ZeroDivisionError):
        return None


@register_verifier("numeric")
def numeric(predicted: str, reference: str, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> Verdict:
    want = parse_number(reference)
    if want is None:
        raise ValueError(f"reference {reference!r} is not a number")
    got = parse_number(predicted)
    if got is None:
        return Verdict(False, "The answer contains no number.")
    if math.isclose(got, want, rel_tol=rel_tol, abs_tol=abs_tol):
        return Verdict(True)
    return Verdict(False, f"The number {got:g} is off by {got - want:+g}.")


def _math_parse(text: str):
    from math_verify import parse

    if "$" in text or "\\boxed" in text:
        return parse(text)
    return parse(f"${text}$") or parse(text)  # a bare answer: as LaTeX first, else as an expression


@register_verifier("math")
def math_equivalent(predicted: str, reference: str) -> Verdict:
    from math_verify import verify as mv_verify

    gold, got = _math_parse(reference), _math_parse(predicted)
    if not gold:
        raise ValueError(f"reference {reference!r} is not a parseable math answer")
    if not got:
        return Verdict(False, "The answer is not a parseable mathematical expression.")
    if mv_verify(gold, got):
        return Verdict(True)
    return Verdict(False, "The expression is not mathematically equivalent to the reference.")


def json_diff(got: Any, want: Any, path: str = "") -> list[str]:
    """Human-readable differences between two JSON values (missing/extra keys, changed leaves)."""
    if isinstance(got, dict) and isinstance(want, dict):
        out = [f"missing key {path}{k!r}" for k in want if k not in got]
        out += [f"unexpected key {path}{k!r}" for k in got if k not in want]
        for k in want:
            if k in got:
                out += json_diff(got[k], want[k], f"{path}[{k!r}]")
        return out
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in json_diff(g, w, f"{path}[{i}]")]
    if got != want:
        return [f"{path or 'the value'}: you gave {json.dumps(got)}, expected {json.dumps(want)}"]
    return []


@register_verifier("json")
def json_equal(predicted: str, reference: str) -> Verdict:
    want = json.loads(reference)
    try:
        got = json.loads(predicted)
    except ValueError:
        return Verdict(False, "The answer is not valid JSON.")
    diffs = json_diff(got, want)
    return Verdict(not diffs, ("Differences: " + "; ".join(diffs[:5]) + ".") if diffs else "")


@register_verifier("regex")
def regex(predicted: str, reference: str, search: bool = False, ignore_case: bool = False) -> Verdict:
    pattern = re.compile(reference, re.IGNORECASE if ignore_case else 0)
    matched = pattern.search(predicted) if search else pattern.fullmatch(predicted.strip())
    return Verdict(True) if matched else Verdict(False, "The answer does not have the required form.")
