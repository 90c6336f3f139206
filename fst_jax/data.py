"""The problem stream: a grain pipeline over a task's training examples.

``ProblemStream`` shuffles a fixed pool of examples with a seed, reshuffles every epoch
(grain's ``shuffle`` then ``repeat``), optionally keeps one process's shard, and hands out
batches of ``batch_size`` problems. Its position is grain's iterator state (a small dict), saved
in the checkpoint's host state, so a resumed run continues with the same problems.
``peek(k)`` returns the next ``k`` batches without consuming them: the GEPA anchor set of an FST
cycle is exactly the problems of its next ``T`` RL batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain

from fst_jax.config import require
from fst_jax.tasks.base import Example, by_id


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``train_examples``: size of the pool drawn from the task's train split (with
    ``seed``); ``shuffle_seed`` orders it (each epoch anew)."""

    train_examples: int = 1024
    seed: int = 0
    shuffle_seed: int = 0

    def __post_init__(self):
        require(self.train_examples >= 1, "train_examples must be >= 1")


class ProblemStream:
    """Batches of examples in a seeded, per-epoch reshuffled order (endless).

    ``shard=(index, count)`` keeps every ``count``-th example starting at ``index`` (one
    process's share of a multi-host run)."""

    def __init__(self, examples: Sequence[Example], batch_size: int, shuffle_seed: int,
                 shard: tuple[int, int] = (0, 1)):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        by_id(examples)  # ids must be unique: GEPA scores and caches key on them
        index, count = shard
        pool = list(examples)[index::count]
        if len(pool) < batch_size:
            raise ValueError(f"{len(pool)} examples cannot fill a batch of {batch_size}")
        self.batch_size = batch_size
        self._dataset = grain.MapDataset.source(pool).shuffle(seed=shuffle_seed).repeat()
        self._iterator = iter(self._dataset)

    def next_batch(self) -> list[Example]:
        """The next ``batch_size`` examples (consumed)."""
        return [next(self._iterator) for _ in range(self.batch_size)]

    def peek(self, batches: int) -> list[list[Example]]:
        """The next ``batches`` batches, not consumed."""
        start = self.state()["next_index"]
        return [[self._dataset[start + b * self.batch_size + i] for i in range(self.batch_size)]
                for b in range(batches)]

    def state(self) -> dict[str, Any]:
        """grain's iterator state (JSON)."""
        return dict(self._iterator.get_state())

    def load_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(dict(state))
