"""Answer leaks: a proposed context restating an anchor problem with its answer is detected and
GEPA skips it."""

import pytest

from fst_jax.fast.contamination import LeakDetector
from fst_jax.tasks.base import Example

from test_optimizer import ANCHOR, step_once

SAM = Example(id="sam", prompt="Sam had 23 stickers and gave 14 to his sister. How many stickers does Sam have left?",
              answer="9")
# A context the bundled 135M reflector wrote in the quickstart run (its anchor held SAM).
REAL_LEAK = ("Here's a revised version of the instructions that will help the assistant do better:\n\nTo solve this "
             "problem, we need to break it down step by step. First, we find out how many stickers Sam gave to his "
             "sister. We can do this by dividing 23 by 14, which gives us 1.25.\n\nNext, we find out how many "
             "stickers Sam has left. We can do this by subtracting 1 from the total number of stickers Sam gave to "
             "his sister. So, 23 -\n\nFeedback:\nYou answered 16 but the correct answer is 9")


@pytest.mark.parametrize("text, leaks", [
    (REAL_LEAK, True),
    ("Sam had 23 stickers and gave 14 to his sister, so he has 9 left.", True),
    ("Think step by step about how many items are left, then end with '#### <number>'.", False),
    # the same template with other numbers: the template's words, not the problem's numbers or answer
    ("Example: Tom had 30 stickers and gave 5 to his sister. How many stickers does Tom have left? 30 - 5 = 25.",
     False),
    ("Sam had 23 stickers and gave 14 to his sister. How many stickers does Sam have left?", False),  # no answer
    ("Always double-check: the answer 9 is a common slip.", False),  # the answer without the problem
    ("Sam had 23 stickers and gave 14 to his sister; 19 are left.", False),  # '9' only inside another number
])
def test_leak_needs_the_answer_and_most_of_the_problems_distinctive_tokens(text, leaks):
    assert LeakDetector([SAM]).leaked(text) == (["sam"] if leaks else [])


def test_non_word_answers_leak_as_substrings():
    example = Example(id="j", prompt="What does f(3, 'ab') return for the program above?", answer='{"x": [1, 2]}')
    assert LeakDetector([example]).leaked("For f(3, 'ab') the program above will return {\"x\": [1, 2]}") == ["j"]
    with pytest.raises(ValueError):
        LeakDetector([example], overlap=0.0)


def test_gepa_skips_a_child_that_leaks_an_anchor_answer_and_records_which():
    e = ANCHOR[0]
    reply = f"```\nRemember: {e.prompt} The answer is {e.answer}.\n```"
    opt, record = step_once(reply)
    assert record["outcome"] == "skipped:leak" and record["leaked"] == [e.id]
    assert opt.budget.skip_reasons == {"leak": 1} and len(opt.population.members) == 1
    _, record = step_once(reply, leak_overlap=None)
    assert record["outcome"] != "skipped:leak"
