"""``rg:<generator>``: any reasoning-gym generator as a task (``make_task("rg:path_star", degree=4)``).

Options other than the ones below go to the generator's own config (``reasoning_gym
.create_dataset(generator, **options)``); ``rg:codeio`` defaults to output prediction only, the
paper's task (an input prediction has many right answers, which the generator's single-reference
scorer cannot see). Note that in reasoning-gym 0.1.25 ``input_prediction_probability`` is the
probability of an OUTPUT prediction (the names are swapped in its code), hence the default 1.0.

Splits: the generator is seeded from (generator, split, seed) and a problem belongs to the test
split when the SHA-256 of its question text falls below ``test_fraction``, so a question can
never be in both splits, whatever the seeds; repeats within a list are skipped.
``max_question_chars`` (default None: no limit) skips problems whose question is longer (for
``codeio``: a few shipped programs make prompts of over 10k tokens; 4000 characters, about 1.2k
tokens, keeps about 3 in 4); how many were skipped is logged.
Answer: ``fst_jax.tasks.answers.extract_answer`` (``<answer>`` tags, then boxed, ``####``,
"answer is", then the last line), scored by the generator's own ``score_answer``; the score is
binarised (1 only for full credit) unless ``partial_credit`` (for ``codeio`` full credit is
JSON equality, computed directly: the generator's scorer can take seconds per call). Feedback names the right answer and
what was wrong: no answer, unmarked format, wrong value, plus task-specific detail for
``path_star`` (first step that is not an edge), ``knights_knaves`` (people labelled wrongly) and
``codeio`` (invalid JSON, or the fields that differ from the expected value).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import multiprocessing
import os
import random
import re
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable
from unittest import mock

import numpy as np

from fst_jax.config import ConfigError, require
from fst_jax.tasks.answers import extract_answer, format_hint
from fst_jax.tasks.verifiers import json_diff
from fst_jax.tasks.base import DEFAULT_SEED_CONTEXT, Example, in_test_split, register_task, register_task_family

log = logging.getLogger(__name__)

# The generators named in the paper's task families (registered by name; any other works too).
LISTED = ("codeio", "path_star", "knights_knaves", "family_relationships", "zebra_puzzles",
          "gsm_symbolic", "basic_arithmetic")

ORIGINAL_PROMPT = (
    "Given a problem, answer the question by thinking step by step. Once you have thought it through, "
    "give the final answer between <answer> and </answer> tags, e.g. <answer>42</answer>, with only "
    "the answer inside the tags. When an example of the answer format is given, follow it exactly."
)
_GENERATOR_DEFAULTS: dict[str, dict[str, Any]] = {"codeio": {"input_prediction_probability": 1.0}}
_VIRTUAL_SIZE = 1_000_000
# Generators whose items can depend on global random state (codeio: some shipped programs call
# random.* or numpy.random.* themselves, or put a fresh temporary file's name into the question):
# each item is generated twice under different global seeds and dropped if the question or the
# answer differs, since such a problem has no fixed text or no single right answer. reasoning-gym runs codeio's
# shipped reference programs to make an item (its own design; they are vetted data, not model
# output); what they print is swallowed.
_CHECK_DETERMINISM = {"codeio"}
# Generators whose shipped programs write files (into the working directory, or temporary files
# they never remove) while an item is made.
_EXECUTES_CODE = {"codeio"}


class ReasoningGymTask:
    """A reasoning-gym generator behind the Task protocol (see the module doc)."""

    def __init__(self, generator: str, *, partial_credit: bool = False, test_fraction: float = 0.5,
                 seed_context: str = DEFAULT_SEED_CONTEXT, original_prompt: str = ORIGINAL_PROMPT,
                 max_question_chars: int | None = None, **generator_options: Any):
        import reasoning_gym

        if generator not in reasoning_gym.factory.DATASETS:
            raise ConfigError(f"unknown reasoning-gym generator {generator!r}; "
                              f"available: {sorted(reasoning_gym.factory.DATASETS)}")
        require(0.0 < test_fraction < 1.0, "test_fraction must be in (0, 1)")
        require(max_question_chars is None or max_question_chars >= 1, "max_question_chars must be >= 1 or None")
        for reserved in ("seed", "size"):
            require(reserved not in generator_options, f"{reserved!r} is set by the adapter (use examples(seed=...))")
        self.generator, self.name = generator, f"rg:{generator}"
        self.partial_credit, self.test_fraction = bool(partial_credit), float(test_fraction)
        self.seed_context, self.original_prompt = str(seed_context), str(original_prompt)
        self.max_question_chars = max_question_chars
        self.options = {**_GENERATOR_DEFAULTS.get(generator, {}), **generator_options}
        try:
            self._scorer = self._dataset(0)
        except (TypeError, AssertionError, ValueError) as e:
            raise ConfigError(f"rg:{generator}: bad generator options {generator_options}: {e}") from None

    def _dataset(self, seed: int):
        import reasoning_gym

        return reasoning_gym.create_dataset(self.generator, seed=seed, size=_VIRTUAL_SIZE, **self.options)

    def __getstate__(self) -> dict[str, Any]:  # generators are rebuilt, not pickled (reward pools)
        return {k: v for k, v in self.__dict__.items() if k != "_scorer"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._scorer = self._dataset(0)

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """``n`` distinct problems of ``split`` ("train" or "test"); ids ``rg:<gen>-<split>-<seed>-<i>``.

        Generators in ``_EXECUTES_CODE`` make their items in a child process whose working and
        temporary-file directory is a temporary one (removed afterwards), since their programs
        write files, and whose string hashing is seeded (``PYTHONHASHSEED=0``), since some
        programs iterate over sets of strings: every process, run and resume gets the same
        problems."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        dataset_seed = zlib.crc32(f"{self.generator}|{split}|{seed}".encode())
        if self.generator in _EXECUTES_CODE:
            with (tempfile.TemporaryDirectory(prefix="fst_rg_") as work,
                  mock.patch.dict(os.environ, {"PYTHONHASHSEED": "0"}),  # inherited by the child
                  ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_work_in, initargs=(work,)) as child):
                items, broken, too_long = child.submit(_collect, self, dataset_seed, n, split == "test").result()
        else:
            items, broken, too_long = _collect(self, dataset_seed, n, split == "test")
        if broken:
            log.warning("%s: skipped %d items whose generation raised", self.name, broken)
        if too_long:
            log.info("%s: skipped %d %s problems longer than max_question_chars=%d", self.name, too_long,
                     split, self.max_question_chars)
        if len(items) < n:
            raise ValueError(f"{self.name} gave only {len(items)} distinct {split} problems of {n} asked; "
                             f"widen the generator's options")
        return [Example(id=f"{self.name}-{split}-{seed}-{i}", prompt=item["question"],
                        answer=str(item["answer"]), metadata={"entry": item}) for i, item in enumerate(items)]

    def _item(self, dataset, idx: int) -> dict[str, Any] | None:
        """Item ``idx``; None when it depends on the global random state (see _CHECK_DETERMINISM).
        A kept item is the one made under global seed 0 (``random`` and ``numpy.random``), so
        every process makes the same one."""
        if self.generator not in _CHECK_DETERMINISM:
            return dataset[idx]
        state, np_state = random.getstate(), np.random.get_state()
        try:
            items = []
            for global_seed in (0, 1):
                random.seed(global_seed)
                np.random.seed(global_seed)
                with contextlib.redirect_stdout(io.StringIO()):
                    items.append(dataset[idx])
        finally:
            random.setstate(state)
            np.random.set_state(np_state)
        same = all(items[0][k] == items[1][k] for k in ("question", "answer"))
        return items[0] if same else None

    def reward(self, example: Example, completion: str) -> tuple[float, str]:
        """Binarised (or partial) generator score of the extracted answer, and feedback."""
        right = f"The correct answer is {example.answer.rstrip('.')}."
        got = extract_answer(completion)
        if got.text is None:
            return 0.0, f"No answer found: the reply is empty. {right} {format_hint(example.answer)}"
        exact = None if self.partial_credit else FULL_CREDIT.get(self.generator)
        raw = float(exact(got.text, example.answer) if exact else self._scorer.score_answer(got.text, example.metadata["entry"]))
        full = raw >= 1.0 - 1e-9
        score = raw if self.partial_credit else float(full)
        fmt = "" if got.marked else f" Your answer was not marked, so the last line was taken. {format_hint(example.answer)}"
        if full:
            return score, f"Correct: {right}{fmt}"
        detail = DETAILS.get(self.generator, lambda a, e: "")(got.text, example)
        partial = f" It earns partial credit {raw:.2f}." if 0 < raw < 1 else ""
        return score, " ".join(x for x in (f"Your answer {_quote(got.text)} is wrong.{partial}", detail, right) if x) + fmt


def _work_in(directory: str) -> None:
    """A child's working directory and ``tempfile`` directory become ``directory``."""
    os.chdir(directory)
    tempfile.tempdir = directory


def _collect(task: ReasoningGymTask, dataset_seed: int, n: int, want_test: bool) -> tuple[list[dict], int, int]:
    """Up to ``n`` distinct items of the split, how many items raised while generated, and how
    many of the split's items were longer than ``task.max_question_chars``."""
    dataset, seen, out, broken, too_long = task._dataset(dataset_seed), set(), [], 0, 0
    for idx in range(100 * n + 1000):
        if len(out) == n:
            break
        try:
            item = task._item(dataset, idx)
        except Exception as e:  # a generator bug on one item (e.g. a codeio program whose output is not JSON)
            broken += 1
            log.debug("%s item %d failed: %s: %s", task.name, idx, type(e).__name__, e)
            continue
        if item is None:
            continue
        if item["question"] in seen or in_test_split(item["question"], task.test_fraction) != want_test:
            continue
        if task.max_question_chars is not None and len(item["question"]) > task.max_question_chars:
            too_long += 1
            continue
        seen.add(item["question"])
        out.append(item)
    return out, broken, too_long


def _quote(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


# -- task-specific detail: (answer text, example) -> sentence ----------------------------------
def _path_star_detail(answer: str, example: Example) -> str:
    task_line = example.prompt.strip().splitlines()[-1]  # "|u v|u v.../start goal = "
    edges_part, _, ends = task_line.partition("/")
    edges = {frozenset(map(int, e.split())) for e in edges_part.split("|") if e.strip()}
    start, goal = (int(x) for x in ends.replace("=", " ").split()[:2])
    tokens = answer.split()
    if not tokens or not all(re.fullmatch(r"-?\d+", t) for t in tokens):
        return "The answer must be node labels only, separated by single spaces."
    nodes = [int(t) for t in tokens]
    if nodes[0] != start:
        return f"The path must start at the start node {start}, not {nodes[0]}."
    for i, (u, v) in enumerate(zip(nodes, nodes[1:]), 1):
        if frozenset((u, v)) not in edges:
            return f"Step {i} ({u} -> {v}) is not an edge of the graph."
    if nodes[-1] != goal:
        return f"The path follows edges but ends at {nodes[-1]}, not at the goal node {goal}."
    return ""


def _knights_knaves_detail(answer: str, example: Example) -> str:
    from reasoning_gym.logic.knights_knaves import KnightsKnavesDataset

    truth = dict(KnightsKnavesDataset._normalize_answer(example.answer))
    given = dict(KnightsKnavesDataset._normalize_answer(answer))
    wrong = [f"{name.title()} is {truth[name]}, not {given[name]}" for name in truth if name in given and given[name] != truth[name]]
    missing = [name.title() for name in truth if name not in given]
    parts = []
    if wrong:
        parts.append("Labelled wrongly: " + "; ".join(wrong) + ".")
    if missing:
        parts.append("No label given for: " + ", ".join(missing) + ".")
    return " ".join(parts)


def _codeio_detail(answer: str, example: Example) -> str:
    try:
        got = json.loads(answer)
    except ValueError:
        return "The answer is not valid JSON (write the output as a JSON value)."
    diffs = json_diff(got, json.loads(example.answer))
    return ("Differences: " + "; ".join(diffs[:5]) + ".") if diffs else ""


def _json_equal(answer: str, reference: str) -> bool:
    try:
        return json.loads(answer) == json.loads(reference)
    except ValueError:
        return False


# Binary-mode scorers replacing the generator's where its partial credit is costly: codeio's
# JSON tree edit distance takes over 10 s on some large outputs; full credit there is JSON equality.
FULL_CREDIT: dict[str, Callable[[str, str], bool]] = {"codeio": _json_equal}

DETAILS: dict[str, Callable[[str, Example], str]] = {
    "path_star": _path_star_detail,
    "knights_knaves": _knights_knaves_detail,
    "codeio": _codeio_detail,
}


@register_task_family("rg")
def reasoning_gym_task(generator: str, **options: Any) -> ReasoningGymTask:
    """Factory for ``rg:<generator>`` names."""
    return ReasoningGymTask(generator, **options)


for _name in LISTED:
    register_task(f"rg:{_name}")(functools.partial(ReasoningGymTask, _name))
