"""The final-answer extraction rule shared by the tasks (reasoning-gym, CodeIO, user datasets).

``extract_answer(completion)`` returns the answer text and whether it was explicitly marked.
In order, the first rule that matches wins:
1. the last ``<answer>...</answer>`` span (reasoning-gym's convention);
2. the last ``\\boxed{...}`` (balanced braces);
3. the rest of the line after the last ``####``;
4. the rest of the line after the last ``final answer``/``answer is``/``answer:`` (any case);
5. otherwise the last non-empty line, unmarked.
The text is stripped of surrounding whitespace, markdown ``**``/backticks and one trailing
period. An empty or whitespace-only completion gives ``None``.
"""

from __future__ import annotations

import dataclasses
import re

_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_PHRASE = re.compile(r"(?:final answer[ \t]*(?:is|:)?|answer is|answer:)[ \t]*:?[ \t]*([^\n]*)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Extracted:
    """An extracted answer: ``text`` (None when nothing was found) and whether it was marked."""

    text: str | None
    marked: bool


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def clean(text: str) -> str:
    """Strip whitespace, markdown emphasis/backticks and one trailing period."""
    def drop_period(t: str) -> str:
        return t[:-1].rstrip() if t.endswith(".") and not t.endswith("..") else t

    text = drop_period(text.strip())
    for wrap in ("**", "`", "*"):
        while len(text) >= 2 * len(wrap) and text.startswith(wrap) and text.endswith(wrap):
            text = text[len(wrap):-len(wrap)].strip()
    return drop_period(text)


def extract_answer(completion: str) -> Extracted:
    """The final answer of ``completion`` by the module's rule."""
    tags = _TAG.findall(completion)
    if tags:
        return Extracted(clean(tags[-1]), True)
    boxed = _last_boxed(completion)
    if boxed is not None:
        return Extracted(clean(boxed), True)
    for pattern in (_HASHES, _PHRASE):
        found = [m for m in pattern.findall(completion) if clean(m)]
        if found:
            return Extracted(clean(found[-1]), True)
    lines = [line for line in completion.splitlines() if clean(line)]
    return Extracted(clean(lines[-1]), False) if lines else Extracted(None, False)


def format_hint(example_answer: str) -> str:
    """The sentence telling the model how to mark its answer."""
    return f"End your reply with the final answer between <answer> and </answer> tags, e.g. <answer>{example_answer}</answer>."
