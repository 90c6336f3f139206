"""Answer leaks: a proposed context that restates an anchor problem together with its answer.

The reflection LM sees anchor problems, the policy's outputs and feedback that names the right
answer; a weak reflector copies them into the context ("... Sam gave 14 of his 23 stickers ...
Feedback: the correct answer is 9"). Such a context scores well on its anchor problems, which are
the next RL batches' problems, by memorisation, so GEPA would select it for the wrong reason.

Rule (a heuristic, documented so that it can be argued with): a text leaks example ``e`` when
it contains ``e``'s reference answer as a whole word (or as a substring, for answers that are not
a single word), every number of ``e``'s prompt, and at least ``overlap`` of ``e``'s distinctive
prompt tokens (lower-cased words of 4 or more letters, and numbers). A worked example of the same
template with other numbers shares the template's words but not the numbers or the answer, and
does not leak.
"""

from __future__ import annotations

import re
from typing import Sequence

from fst_jax.tasks.base import Example

_TOKEN = re.compile(r"\d+(?:\.\d+)?|[^\W\d_]+")


def _tokens(text: str) -> set[str]:
    return {t for t in _TOKEN.findall(text.lower()) if t[0].isdigit() or len(t) >= 4}


def _has_answer(text: str, answer: str) -> bool:
    answer = answer.strip().lower()
    if not answer:
        return False
    if re.fullmatch(r"[\w.\-]+", answer):
        return re.search(rf"(?<![\w.]){re.escape(answer)}(?![\w]|\.\d)", text) is not None
    return answer in text


class LeakDetector:
    """Finds anchor examples that a text leaks (see the module doc). ``overlap`` in (0, 1]."""

    def __init__(self, examples: Sequence[Example], overlap: float = 0.5):
        if not 0.0 < overlap <= 1.0:
            raise ValueError("overlap must be in (0, 1]")
        self.overlap = overlap
        self._examples = []  # (example, distinctive tokens, numbers)
        for e in examples:
            tokens = _tokens(e.prompt)
            self._examples.append((e, tokens, {t for t in tokens if t[0].isdigit()}))

    def leaked(self, text: str) -> list[str]:
        """Ids of the examples that ``text`` leaks, in anchor order."""
        lowered, present = text.lower(), _tokens(text)
        return [e.id for e, distinctive, numbers in self._examples
                if distinctive and numbers <= present and len(distinctive & present) >= self.overlap * len(distinctive)
                and _has_answer(lowered, e.answer)]
