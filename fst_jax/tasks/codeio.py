"""``codeio``: predict what a small generated Python program returns, with execution feedback.

Programs come from seeded templates of several shapes (counting loops, string rewriting, list
filtering, recursion, integer arithmetic whose divisor can be zero, dictionary tallies, indexing
that can run off the end). The ground truth comes from running the program in the sandbox
(``fst_jax.tasks.sandbox``): the ``repr`` of the returned value, or the exception it raises with
its message and line. The answer is a Python literal (``[1, 2]``, ``'ab'``, ``7``) or, when the
program raises, the exception's name; it is extracted by ``fst_jax.tasks.answers`` and compared
as a value (``ast.literal_eval``), so spacing and quote style do not matter. The feedback gives
the true value and, for a raising program, the exception, message, line number and source line,
as in the FST paper's CodeIO figure. Splits: a question is in the test split when its SHA-256
falls below ``test_fraction``, so the splits never share a program+input.
"""

from __future__ import annotations

import ast
import random
import textwrap
from typing import Any, Callable

from fst_jax.config import require
from fst_jax.tasks.answers import extract_answer, format_hint
from fst_jax.tasks.base import DEFAULT_SEED_CONTEXT, Example, in_test_split, register_task
from fst_jax.tasks.sandbox import run_python

ORIGINAL_PROMPT = (
    "You will be shown a short Python program. Trace its execution carefully, step by step, and "
    "work out the value of `result`. Give the value as a Python literal between <answer> and "
    "</answer> tags, e.g. <answer>[3, 'a']</answer>. If the program raises an exception, answer "
    "with the exception's name instead, e.g. <answer>ZeroDivisionError</answer>."
)

QUESTION = (
    "What is the value of `result` after running this Python program? If it raises an exception, "
    "give the exception's name.\n\n```python\n{program}\n```"
)


def _loop(rng: random.Random) -> tuple[str, str]:
    m, k, d, start = rng.randint(2, 4), rng.randint(1, 5), rng.randint(1, 3), rng.randint(0, 2)
    src = f"""
    def f(n):
        total = {rng.randint(0, 5)}
        for i in range({start}, n):
            if i % {m} == 0:
                total += i * {k}
            else:
                total -= {d}
        return total
    """
    return src, f"f({rng.randint(0, 12)})"


def _string(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice("abcdeio0123456789xyz") for _ in range(rng.randint(3, 8)))
    k, step = rng.randint(1, 9), rng.choice(["", "[::-1]", "[1:]", "[::2]"])
    src = f"""
    def f(s):
        out = []
        for ch in s:
            if ch in "aeiou":
                out.append(ch.upper())
            elif ch.isdigit():
                out.append(str((int(ch) + {k}) % 10))
            else:
                out.append(ch)
        return "".join(out){step}
    """
    return src, f"f({word!r})"


def _list(rng: random.Random) -> tuple[str, str]:
    xs = [rng.randint(-9, 20) for _ in range(rng.randint(3, 7))]
    cmp, t, k, m = rng.choice([">", "<", ">=", "!="]), rng.randint(0, 10), rng.randint(-2, 3), rng.randint(1, 4)
    rev = rng.choice(["", ", reverse=True"])
    src = f"""
    def f(xs):
        result = []
        for x in xs:
            if x {cmp} {t}:
                result.append(x * {k})
        return sorted(result{rev})[:{m}]
    """
    return src, f"f({xs})"


def _recursion(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        b0, op, c = rng.randint(0, 2), rng.choice(["+", "-", "*"]), rng.randint(0, 2)
        src = f"""
        def f(n):
            if n <= 1:
                return n + {b0}
            return f(n - 1) {op} f(n - 2) + {c}
        """
        return src, f"f({rng.randint(0, 7)})"
    base = rng.randint(2, 10)
    src = f"""
    def f(n):
        if n < {base}:
            return [n]
        return f(n // {base}) + [n % {base}]
    """
    return src, f"f({rng.randint(0, 500)})"


def _division(rng: random.Random) -> tuple[str, str]:
    k, m = rng.randint(1, 5), rng.randint(1, 4)
    b = k if rng.random() < 0.35 else rng.randint(0, 9)  # b == k divides by zero
    src = f"""
    def f(a, b):
        q = a // (b - {k})
        r = a % (b - {k})
        return q * {m} + r
    """
    return src, f"f({rng.randint(-20, 40)}, {b})"


def _tally(rng: random.Random) -> tuple[str, str]:
    pool = ["apple", "kiwi", "fig", "plum", "pear", "lime", "date", "yam", "oat"]
    words = [rng.choice(pool) for _ in range(rng.randint(2, 6))]
    i = rng.randint(0, 3)  # "fig"[3] raises IndexError
    src = f"""
    def f(words):
        counts = {{}}
        for w in words:
            key = w[{i}]
            counts[key] = counts.get(key, 0) + len(w)
        return sorted(counts.items())
    """
    return src, f"f({words})"


def _indexing(rng: random.Random) -> tuple[str, str]:
    xs = [rng.randint(0, 9) for _ in range(rng.randint(2, 5))]
    src = """
    def f(xs, i):
        return xs[i] + xs[-i - 1] * 2
    """
    return src, f"f({xs}, {rng.randint(0, len(xs))})"


SHAPES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "loop": _loop, "string": _string, "list": _list, "recursion": _recursion,
    "division": _division, "tally": _tally, "indexing": _indexing,
}

# Runs every program of a batch in its own namespace inside ONE sandbox call (the programs are
# ours and bounded; the sandbox still isolates them from the host).
_HARNESS = '''
import traceback
results = []
for i, src in enumerate(PROGRAMS):
    try:
        ns = {"__name__": "__main__"}
        exec(compile(src, "<prog%d>" % i, "exec"), ns)
        results.append(("value", repr(ns["result"])))
    except Exception as e:
        line = None
        for fr in traceback.extract_tb(e.__traceback__):
            if fr.filename == "<prog%d>" % i:
                line = fr.lineno
        results.append(("raise", type(e).__name__, str(e), line))
'''


def _same_value(text: str, expected_repr: str) -> bool | None:
    """Whether ``text`` is the same Python value as ``expected_repr``; None if not a literal."""
    try:
        return ast.literal_eval(text) == ast.literal_eval(expected_repr)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


@register_task("codeio")
class CodeIOTask:
    """Output prediction for generated programs (see the module doc). ``shapes`` picks templates."""

    name = "codeio"

    def __init__(self, shapes: tuple[str, ...] | list[str] = tuple(SHAPES), test_fraction: float = 0.5,
                 timeout_s: float = 10.0, seed_context: str = DEFAULT_SEED_CONTEXT,
                 original_prompt: str = ORIGINAL_PROMPT):
        unknown = [s for s in shapes if s not in SHAPES]
        require(not unknown and len(shapes) > 0, f"unknown program shapes {unknown}; known: {sorted(SHAPES)}")
        require(0.0 < test_fraction < 1.0, "test_fraction must be in (0, 1)")
        self.shapes, self.test_fraction, self.timeout_s = tuple(shapes), float(test_fraction), float(timeout_s)
        self.seed_context, self.original_prompt = str(seed_context), str(original_prompt)

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """``n`` distinct programs of ``split``; ids ``codeio-<split>-<seed>-<i>``."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"codeio:{split}:{seed}")
        programs: list[tuple[str, str]] = []
        seen: set[str] = set()
        for _ in range(200 * n + 1000):
            if len(programs) == n:
                break
            shape = self.shapes[rng.randrange(len(self.shapes))]
            body, call = SHAPES[shape](rng)
            program = textwrap.dedent(body).strip() + f"\n\nresult = {call}"
            question = QUESTION.format(program=program)
            if question not in seen and in_test_split(question, self.test_fraction) == (split == "test"):
                seen.add(question)
                programs.append((shape, program))
        if len(programs) < n:
            raise ValueError(f"codeio gave only {len(programs)} distinct {split} programs of {n} asked")
        outcomes = self._run([p for _, p in programs])
        out = []
        for i, ((shape, program), outcome) in enumerate(zip(programs, outcomes)):
            meta: dict[str, Any] = {"shape": shape, "program": program}
            if outcome[0] == "value":
                answer = outcome[1]
            else:
                _, answer, message, line = outcome
                source = program.splitlines()[line - 1].strip() if line else None
                meta.update(error_message=message, error_line=line, error_source=source)
            out.append(Example(id=f"codeio-{split}-{seed}-{i}", prompt=QUESTION.format(program=program),
                               answer=answer, metadata=meta))
        return out

    def _run(self, programs: list[str]) -> list[tuple]:
        code = f"PROGRAMS = {programs!r}\n{_HARNESS}"
        result = run_python(code, timeout_s=self.timeout_s, memory_mb=512, capture="results")
        if not result.ok:
            raise RuntimeError(f"codeio ground-truth run failed in the sandbox: {result.describe()}")
        return ast.literal_eval(result.value_repr)

    def reward(self, example: Example, completion: str) -> tuple[float, str]:
        """1 if the extracted answer is the program's value (or its exception's name), else 0."""
        meta = example.metadata
        raises = "error_message" in meta
        if raises:
            where = f" at line {meta['error_line']} (`{meta['error_source']}`)" if meta.get("error_line") else ""
            truth = f"The program raises {example.answer}: {meta['error_message']}{where}."
        else:
            truth = f"The program sets result = {example.answer}."
        got = extract_answer(completion)
        if got.text is None:
            return 0.0, f"No answer found: the reply is empty. {truth} {format_hint(example.answer)}"
        fmt = "" if got.marked else f" Your answer was not marked, so the last line was taken. {format_hint(example.answer)}"
        if raises:
            if example.answer in got.text:
                return 1.0, f"Correct. {truth}{fmt}"
            return 0.0, f"You answered {got.text[:200]!r}, which is wrong. {truth}{fmt}"
        same = _same_value(got.text, example.answer)
        if same:
            return 1.0, f"Correct. {truth}{fmt}"
        if same is None:
            error_names = [w for w in ("Error", "Exception") if w in got.text]
            why = ("The program does not raise an exception." if error_names
                   else "Your answer is not a Python literal (write a value such as 7, 'ab' or [1, 2]).")
            return 0.0, f"You answered {got.text[:200]!r}. {why} {truth}{fmt}"
        return 0.0, f"You answered {got.text[:200]!r}, which is wrong. {truth}{fmt}"
