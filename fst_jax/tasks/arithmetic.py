"""``arithmetic``: templated one-step word problems (add, subtract, multiply) from a seed.

No downloads: problems are drawn independently (so a large pool repeats some; 8200 distinct
problems in all) from ``random.Random(f"{split}:{seed}")``, keeping those of ``split``: a problem
is in the test split when the SHA-256 of its text falls below ``test_fraction``
(``in_test_split``), so train and test never share a problem, whatever the seeds. The reward reads
the final number of a completion, preferring an explicit marker: ``#### 42``, then
``answer is 42``, then the last number in the text. Any of the three counts as an answer (score 1
when it equals the reference); the feedback names the correct answer with its expression and what
went wrong: no number found, an unmarked answer (format), or a wrong value.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

from fst_jax.config import require
from fst_jax.tasks.base import DEFAULT_SEED_CONTEXT, Example, in_test_split, register_task

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_MARKED = (
    re.compile(r"####\s*\$?\s*(" + _NUMBER + ")"),
    re.compile(r"answer\s+is\s*:?\s*\$?\s*(" + _NUMBER + ")", re.IGNORECASE),
)
_ANY_NUMBER = re.compile(_NUMBER)

# (operation, template); {a} and {b} are the operands.
TEMPLATES: tuple[tuple[str, str], ...] = (
    ("+", "Mia has {a} marbles. Her friend gives her {b} more. How many marbles does Mia have now?"),
    ("+", "A bus carries {a} people. At the next stop {b} people get on. How many people are on the bus?"),
    ("-", "A baker made {a} rolls and sold {b} of them. How many rolls are left?"),
    ("-", "Sam had {a} stickers and gave {b} to his sister. How many stickers does Sam have left?"),
    ("*", "There are {a} boxes with {b} pencils in each box. How many pencils are there in total?"),
    ("*", "A garden has {a} rows of plants with {b} plants in each row. How many plants are there?"),
)


ORIGINAL_PROMPT = "Solve the word problem. Show your working briefly, then end your reply with '#### <number>'."


def _operands(op: str, rng: random.Random) -> tuple[int, int]:
    if op == "*":
        return rng.randint(2, 12), rng.randint(2, 12)
    a, b = rng.randint(2, 60), rng.randint(1, 40)
    if op == "-" and b > a:
        a, b = b, a
    return a, b


def parse_answer(completion: str) -> tuple[float | None, bool]:
    """The final number of ``completion`` and whether it was marked (``####`` / ``answer is``)."""
    for pattern in _MARKED:
        found = pattern.findall(completion)
        if found:
            return float(found[-1].replace(",", "")), True
    numbers = _ANY_NUMBER.findall(completion)
    if numbers:
        return float(numbers[-1].replace(",", "")), False
    return None, False


def _show(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


@register_task("arithmetic")
class ArithmeticTask:
    """One-step arithmetic word problems with small operands (``operators``: which of ``+ - *``).
    Train and test problems are disjoint (a hash of the prompt picks the split); the test split's
    problems are distinct (validation statistics count problems), the train split is a stream
    drawn with replacement."""

    name = "arithmetic"

    def __init__(self, test_fraction: float = 0.5, seed_context: str = DEFAULT_SEED_CONTEXT,
                 original_prompt: str = ORIGINAL_PROMPT, operators: Sequence[str] = ("+", "-", "*")):
        require(0.0 < test_fraction < 1.0, "test_fraction must be in (0, 1)")
        require(len(operators) > 0 and set(operators) <= {"+", "-", "*"},
                f"operators must be a non-empty subset of + - *, got {list(operators)}")
        self.test_fraction = float(test_fraction)
        self.seed_context, self.original_prompt = str(seed_context), str(original_prompt)
        self.templates = [(op, t) for op, t in TEMPLATES if op in operators]

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """``n`` problems of ``split`` ("train" or "test"); ids are ``arith-{split}-{seed}-{i}``.
        ValueError when ``200 * n + 1000`` draws do not find ``n`` problems of the split."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"{split}:{seed}")
        out: list[Example] = []
        seen: set[str] = set()
        for _ in range(200 * n + 1000):
            if len(out) == n:
                break
            op, template = self.templates[rng.randrange(len(self.templates))]
            a, b = _operands(op, rng)
            prompt = template.format(a=a, b=b)
            if in_test_split(prompt, self.test_fraction) != (split == "test"):
                continue
            if split == "test" and prompt in seen:
                continue
            seen.add(prompt)
            value = {"+": a + b, "-": a - b, "*": a * b}[op]
            out.append(Example(id=f"arith-{split}-{seed}-{len(out)}", prompt=prompt, answer=str(value),
                               metadata={"a": a, "b": b, "op": op, "expression": f"{a} {op} {b}"}))
        if len(out) < n:
            raise ValueError(f"arithmetic found only {len(out)} {split} problems of {n} asked "
                             f"(test_fraction {self.test_fraction})")
        return out

    def reward(self, example: Example, completion: str) -> tuple[float, str]:
        """1 if the final number equals the answer, else 0; feedback says what went wrong."""
        correct = f"{example.answer} ({example.metadata['expression']})"
        value, marked = parse_answer(completion)
        if value is None:
            return 0.0, (
                f"No number found in your reply. The correct answer is {correct}. "
                f"End your reply with '#### <number>'."
            )
        if value == float(example.answer):
            if marked:
                return 1.0, f"Correct: the answer is {correct}."
            return 1.0, (
                f"Correct value {example.answer}, but in the wrong format: the answer was not marked. "
                f"End your reply with '#### {example.answer}'."
            )
        hint = "" if marked else " Also end your reply with '#### <number>'."
        return 0.0, f"You answered {_show(value)} but the correct answer is {correct}.{hint}"
