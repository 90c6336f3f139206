"""The run folder as a type, and the table of modes.

A training run (``fst_jax.jobs.train``) or a distillation (``fst_jax.jobs.distill``) writes one
folder; ``RunFolder`` owns its file names and shapes, and every job writes and reads through it:

- ``config.yaml``: the configuration it ran under;
- ``<stream>.jsonl``, one JSON object a line with its ``step``: ``steps`` (one line per RL
  step), ``gepa`` (one per GEPA round), ``eval`` (one per evaluation), ``eval_problems`` (the
  per-problem scores behind each ``eval`` line);
- ``contexts.json``: the contexts kept at the end, best first, each a ``Member`` as a dict
  (``components["context"]`` is the text; mode rl keeps the original prompt, origin
  ``"original"``);
- ``hf/``: the trained weights as a Hugging Face folder; ``result.json``: the run's summary
  (``steps_done`` and ``steps`` among its keys); ``checkpoints/`` (by default).

``MODES`` is the one table of training modes: which channels each trains. Jobs, the comparison,
the plasticity probe and distillation read it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from fst_jax.metrics import read_jsonl

STEPS, GEPA, EVAL, EVAL_PROBLEMS = "steps", "gepa", "eval", "eval_problems"


@dataclasses.dataclass(frozen=True)
class Mode:
    """A training mode: whether it trains the weights (the slow channel) and whether it evolves
    the contexts (the fast channel)."""

    name: str
    trains_weights: bool
    evolves_contexts: bool


MODES: dict[str, Mode] = {m.name: m for m in (Mode("rl", trains_weights=True, evolves_contexts=False),
                                               Mode("gepa", trains_weights=False, evolves_contexts=True),
                                               Mode("fst", trains_weights=True, evolves_contexts=True))}
WEIGHT_MODES = tuple(m for m, mode in MODES.items() if mode.trains_weights)
CONTEXT_MODES = tuple(m for m, mode in MODES.items() if mode.evolves_contexts)


class RunFolder:
    """One run's folder (see the module doc). Reads return ``[]`` / None for files not written
    yet; writes of shared files are the caller's to make on process 0 only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def weights(self) -> Path:
        """The exported Hugging Face folder (``hf/``)."""
        return self.path / "hf"

    def stream(self, name: str) -> Path:
        return self.path / f"{name}.jsonl"

    def rows(self, name: str) -> list[dict[str, Any]]:
        """The lines of stream ``name`` (``[]`` before any)."""
        return read_jsonl(self.stream(name))

    def result(self) -> dict[str, Any] | None:
        path = self.path / "result.json"
        return json.loads(path.read_text()) if path.exists() else None

    def write_result(self, summary: dict[str, Any]) -> None:
        (self.path / "result.json").write_text(json.dumps(summary, indent=2))

    def has_contexts(self) -> bool:
        return (self.path / "contexts.json").is_file()

    def members(self) -> list[dict[str, Any]]:
        """The kept contexts as ``Member`` dicts, best first (``[]`` before the run ends)."""
        path = self.path / "contexts.json"
        return json.loads(path.read_text()) if path.exists() else []

    def contexts(self) -> list[str]:
        """The kept context texts, best first."""
        return [m["components"]["context"] for m in self.members()]

    def write_contexts(self, members: Sequence[dict[str, Any]]) -> None:
        (self.path / "contexts.json").write_text(json.dumps(list(members), indent=2))

    def finished(self, steps: int, needs_weights: bool) -> bool:
        """Whether ``result.json`` says all ``steps`` ran and, with ``needs_weights``, ``hf/``
        holds the exported weights."""
        result = self.result()
        return (result is not None and result.get("steps_done") == steps
                and (not needs_weights or self.weights.is_dir()))

    def read(self, mode: str) -> "RunLogs":
        """Everything the reports read, at once."""
        return RunLogs(mode, self, self.rows(STEPS), self.rows(EVAL), self.rows(GEPA), self.result())


@dataclasses.dataclass
class RunLogs:
    """A run folder as read by ``RunFolder.read``: its ``steps``/``eval``/``gepa`` lines and
    ``result.json`` (None while unfinished)."""

    mode: str
    folder: RunFolder
    steps: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    gepa: list[dict[str, Any]]
    result: dict[str, Any] | None

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key`` over the evaluations that logged it."""
        pts = sorted((r["step"], float(r[key])) for r in self.eval if r.get(key) is not None)
        return [s for s, _ in pts], [v for _, v in pts]
