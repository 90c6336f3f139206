"""Metric writers: JSON lines (always), TensorBoard (tensorboardX) and Weights & Biases (optional).

A writer takes ``write(stream, step, record)``: ``stream`` names the kind of record ("steps" for
one line per RL step, "gepa" for one line per GEPA round), ``record`` is a flat dict of JSON
values. ``JsonlWriter`` appends to ``<dir>/<stream>.jsonl`` and, on resume, cuts every line at or
after the resumed step (including a half-written last line), so a resumed run's files read as if
it had never stopped. Only process 0 writes; the writers are passed explicitly, never global.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
from pathlib import Path
from typing import Any, Protocol, Sequence

from fst_jax import distributed

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """``tensorboard``: event files under ``<output_dir>/tensorboard``; ``wandb``: also log to
    Weights & Biases (needs the ``wandb`` package; ``wandb_project`` names the project);
    ``progress``: a progress bar on stderr."""

    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "fst_jax"
    progress: bool = True


class MetricWriter(Protocol):
    def write(self, stream: str, step: int, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a line that does not parse (a write cut short) is
    skipped. Missing file: ``[]``."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class JsonlWriter:
    """``<directory>/<stream>.jsonl``, one JSON object a line, flushed per line."""

    def __init__(self, directory: str | Path, resume_step: int = 0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in self.directory.glob("*.jsonl"):
            kept = [r for r in read_jsonl(path) if r.get("step", 0) < resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, stream: str, step: int, record: dict[str, Any]) -> None:
        with open(self.directory / f"{stream}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")

    def close(self) -> None:
        pass


def _tag(stream: str, key: str) -> str:
    """``stream/key`` for TensorBoard and W&B: no doubled stream prefix (``eval/eval/...``) and
    ``@`` spelled ``_at_`` (tensorboardX renames tags with ``@``, warning each time)."""
    key = key.removeprefix(f"{stream}/").replace("@", "_at_")
    return f"{stream}/{key}"


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, numbers.Number) and not isinstance(v, bool)}


class TensorBoardWriter:
    """Scalars to TensorBoard event files; events past ``resume_step`` are purged on resume."""

    def __init__(self, directory: str | Path, resume_step: int = 0):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(directory), purge_step=resume_step or None)

    def write(self, stream: str, step: int, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self._writer.add_scalar(_tag(stream, key), value, step)

    def close(self) -> None:
        self._writer.close()


class WandbWriter:
    """Scalars to a Weights & Biases run (resumed by id when the run folder is reused)."""

    def __init__(self, directory: str | Path, project: str, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise RuntimeError("logging.wandb=true needs the wandb package: pip install wandb") from None
        run_id_file = Path(directory) / "wandb_run_id"
        run_id = run_id_file.read_text().strip() if run_id_file.exists() else wandb.util.generate_id()
        run_id_file.write_text(run_id)
        self._run = wandb.init(project=project, id=run_id, resume="allow", dir=str(directory),
                               config=config)

    def write(self, stream: str, step: int, record: dict[str, Any]) -> None:
        self._run.log({_tag(stream, k): v for k, v in _scalars(record).items()}, step=step)

    def close(self) -> None:
        self._run.finish()


class MultiWriter:
    """Fans records out to several writers; only process 0 writes anything."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = list(writers) if distributed.is_primary() else []

    def write(self, stream: str, step: int, record: dict[str, Any]) -> None:
        for w in self.writers:
            w.write(stream, step, record)

    def close(self) -> None:
        for w in self.writers:
            w.close()


def make_writers(cfg: LoggingConfig, output_dir: str | Path, resume_step: int,
                 run_config: dict[str, Any]) -> MultiWriter:
    """JSONL always; TensorBoard and W&B as configured."""
    if not distributed.is_primary():
        return MultiWriter([])
    out = Path(output_dir)
    writers: list[MetricWriter] = [JsonlWriter(out, resume_step)]
    if cfg.tensorboard:
        writers.append(TensorBoardWriter(out / "tensorboard", resume_step))
    if cfg.wandb:
        writers.append(WandbWriter(out, cfg.wandb_project, run_config))
    return MultiWriter(writers)
