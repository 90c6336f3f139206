"""User datasets as tasks: ``jsonl`` (local JSON-lines files) and ``tfds`` (a tensorflow-datasets
dataset already prepared in a local ``data_dir``; nothing is downloaded), scored by a verifier.

Both take ``prompt_field`` / ``answer_field`` (and optionally ``id_field``) naming the record
fields, ``verifier`` (a name in ``fst_jax.tasks.verifiers.VERIFIERS``) with ``verifier_options``,
and the two contexts. The answer is extracted from the completion by
``fst_jax.tasks.answers.extract_answer`` and checked by the verifier; the score is 0/1 and the
feedback gives the reference answer and the verifier's detail. ``examples(split, n, seed)``
shuffles the split's records with ``seed`` and takes the first ``n`` (ValueError past its size).

``jsonl`` splits: ``path`` (may contain ``{split}``, filled with "train"/"test"), or ``path`` for
train and ``test_path`` for test, or one file split by the SHA-256 of each prompt
(``test_fraction``), so a prompt is never in both splits. ``tfds`` splits are the dataset's own
(``train_split``/``test_split``), read with ``builder.as_data_source`` (array_record; no
TensorFlow needed). tensorflow-datasets is the optional ``tfds`` extra.
"""

from __future__ import annotations

import abc
import json
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

from fst_jax.config import ConfigError, require, require_in_registry
from fst_jax.tasks.answers import extract_answer, format_hint
from fst_jax.tasks.base import DEFAULT_SEED_CONTEXT, Example, in_test_split, register_task
from fst_jax.tasks.verifiers import VERIFIERS, verify

ORIGINAL_PROMPT = (
    "Answer the question. Think step by step if it helps, then give only the final answer between "
    "<answer> and </answer> tags."
)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class RecordsTask(abc.ABC):
    """A task over records held in memory per split (the common part of ``jsonl`` and ``tfds``)."""

    def __init__(self, name: str, prompt_field: str, answer_field: str, id_field: str | None,
                 verifier: str, verifier_options: Mapping[str, Any] | None, seed_context: str,
                 original_prompt: str):
        require_in_registry(verifier, VERIFIERS, "verifier")
        self.name, self.prompt_field, self.answer_field, self.id_field = name, prompt_field, answer_field, id_field
        self.verifier, self.verifier_options = verifier, dict(verifier_options or {})
        self.seed_context, self.original_prompt = str(seed_context), str(original_prompt)

    @abc.abstractmethod
    def _records(self, split: str) -> Sequence[Mapping[str, Any]]:
        """All records of ``split`` ("train" or "test"), in a fixed order."""

    def _example(self, split: str, index: int, record: Mapping[str, Any]) -> Example:
        for f in (self.prompt_field, self.answer_field) + ((self.id_field,) if self.id_field else ()):
            if f not in record:
                raise ValueError(f"{self.name}: {split} record {index} has no field {f!r} (fields: {sorted(record)})")
        rid = _text(record[self.id_field]) if self.id_field else f"{split}-{index}"
        return Example(id=f"{self.name}-{rid}", prompt=_text(record[self.prompt_field]),
                       answer=_text(record[self.answer_field]), metadata={"split": split, "index": index})

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """``n`` records of ``split``, shuffled by ``seed``."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        records = self._records(split)
        if n > len(records):
            raise ValueError(f"{self.name}: asked for {n} {split} examples, the split has {len(records)}")
        order = list(range(len(records)))
        random.Random(f"{split}:{seed}").shuffle(order)
        return [self._example(split, i, records[i]) for i in order[:n]]

    def reward(self, example: Example, completion: str) -> tuple[float, str]:
        """1 if the verifier accepts the extracted answer, else 0; feedback with the reference."""
        right = f"The correct answer is {example.answer}."
        got = extract_answer(completion)
        if got.text is None:
            return 0.0, f"No answer found: the reply is empty. {right} {format_hint(example.answer)}"
        verdict = verify(self.verifier, got.text, example.answer, **self.verifier_options)
        fmt = "" if got.marked else f" Your answer was not marked, so the last line was taken. {format_hint(example.answer)}"
        if verdict.correct:
            return 1.0, f"Correct: {right}{fmt}"
        return 0.0, " ".join(x for x in (f"Your answer {got.text[:200]!r} is wrong.", verdict.detail, right) if x) + fmt


@register_task("jsonl")
class JsonlTask(RecordsTask):
    """Records from local JSON-lines files (see the module doc)."""

    def __init__(self, path: str, test_path: str | None = None, test_fraction: float = 0.2,
                 prompt_field: str = "prompt", answer_field: str = "answer", id_field: str | None = None,
                 verifier: str = "exact", verifier_options: Mapping[str, Any] | None = None,
                 seed_context: str = DEFAULT_SEED_CONTEXT, original_prompt: str = ORIGINAL_PROMPT):
        super().__init__("jsonl", prompt_field, answer_field, id_field, verifier,
                         verifier_options, seed_context, original_prompt)
        require(0.0 < test_fraction < 1.0, "test_fraction must be in (0, 1)")
        self.path, self.test_path, self.test_fraction = str(path), test_path, float(test_fraction)
        self._cache: dict[str, list[dict[str, Any]]] = {}

    @staticmethod
    def _read(path: str) -> list[dict[str, Any]]:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ConfigError(f"cannot read JSONL file {path}: {e}") from None
        rows = []
        for i, line in enumerate(lines, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        return rows

    def _records(self, split: str) -> list[dict[str, Any]]:
        if split not in self._cache:
            if "{split}" in self.path:
                self._cache[split] = self._read(self.path.format(split=split))
            elif self.test_path is not None:
                self._cache[split] = self._read(self.test_path if split == "test" else self.path)
            else:
                rows = self._read(self.path)
                for i, row in enumerate(rows):
                    if self.prompt_field not in row:
                        raise ValueError(f"{self.path}: record {i} has no field {self.prompt_field!r}")
                self._cache[split] = [r for r in rows if in_test_split(_text(r[self.prompt_field]),
                                                                       self.test_fraction) == (split == "test")]
        return self._cache[split]


@register_task("tfds")
class TfdsTask(RecordsTask):
    """Records of a tensorflow-datasets dataset prepared in ``data_dir`` (see the module doc)."""

    def __init__(self, dataset: str, data_dir: str, train_split: str = "train", test_split: str = "test",
                 prompt_field: str = "prompt", answer_field: str = "answer", id_field: str | None = None,
                 verifier: str = "exact", verifier_options: Mapping[str, Any] | None = None,
                 seed_context: str = DEFAULT_SEED_CONTEXT, original_prompt: str = ORIGINAL_PROMPT):
        super().__init__(f"tfds:{dataset}", prompt_field, answer_field, id_field, verifier,
                         verifier_options, seed_context, original_prompt)
        self.dataset, self.data_dir = dataset, str(data_dir)
        self.splits = {"train": train_split, "test": test_split}
        self._cache: dict[str, list[dict[str, Any]]] = {}

    def _records(self, split: str) -> list[dict[str, Any]]:
        if split not in self._cache:
            try:
                import tensorflow_datasets as tfds
            except ImportError:
                raise ConfigError("the tfds task needs tensorflow-datasets: pip install 'fst_jax[tfds]'") from None
            builder = tfds.builder(self.dataset, data_dir=self.data_dir)
            source = builder.as_data_source(split=self.splits[split])
            self._cache[split] = [dict(source[i]) for i in range(len(source))]
        return self._cache[split]
