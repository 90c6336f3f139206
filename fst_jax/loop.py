"""The run harness: what every training job does around its steps, in one place.

``Loop`` owns one run folder (``fst_jax.runs.RunFolder``) and everything around a job's steps:
``config.yaml``; restore and save of the device state with a typed ``LoopState`` through the
``Checkpointer`` (both at one step id); the metric writers; the progress bar; the stop signal
agreed across processes (SIGTERM) and ``max_steps_this_run``; and a list of hooks, each with
an interval and, optionally, its own saved state. A job reads::

    loop = Loop(config, output_dir, steps=..., checkpoint=..., logging_config=..., may_change=..., what=...)
    loop.add_hook(Hook(evaluate, every=10, name="eval", state=evaluator))  # a user's hook: the same door
    with loop:
        device_state = loop.restore(device_state, MyLoopState(...))
        while loop.running:
            ...its phases, writing with loop.write(stream, record)...
            loop.run_hooks(info)          # where its state at ``loop.step`` is complete
            loop.advance()
            if loop.checkpoint(device_state):
                break
    loop.run_end_hooks(summary)           # plots, weights export
    loop.write_result(summary)

The checkpoint is the harness's own end of a step, not a hook: a checkpoint at step ``s`` holds
the device state and ``LoopState`` after ``s`` steps (and every hook's state), taken before step
``s``'s own phases (a GEPA round due at ``s`` runs after a resume from it). It is written when
``checkpoint.save_every_steps`` / ``save_every_minutes`` say so, on the run's last step, on an
agreed stop signal and after ``max_steps_this_run`` steps; a rerun of the same command restores
it, refuses a configuration changed outside ``may_change``, cuts the logs back to ``s`` and goes
on from there.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, TypeVar

import jax
import numpy as np

from fst_jax import distributed
from fst_jax.checkpoint import CheckpointConfig, Checkpointer, abstract_target
from fst_jax.config import require, require_unchanged, save_config, to_dict
from fst_jax.metrics import LoggingConfig, make_writers
from fst_jax.runs import RunFolder

log = logging.getLogger(__name__)

S = TypeVar("S", bound="LoopState")


@dataclasses.dataclass
class LoopState:
    """The host state saved with the weights: ``step`` (steps done) and ``config`` (the
    ``to_dict`` of the configuration the run ran under); a job subclasses it with its own
    JSON-serialisable fields (data positions, the population, ...)."""

    step: int = 0
    config: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls: type[S], host: dict[str, Any]) -> S:
        return cls(**{f.name: host[f.name] for f in dataclasses.fields(cls) if f.name in host})


def host_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """A jitted step's replicated scalar metrics as floats (also when they span other
    processes' devices)."""
    return {k: float(np.asarray(v.addressable_data(0))) for k, v in metrics.items()}


class Stateful(Protocol):
    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass
class Hook:
    """``fn(info)`` at every step divisible by ``every`` (0: only when forced), where the job
    calls ``Loop.run_hooks``; ``at_end``: ``fn(summary)`` once when the run ends instead.
    ``state`` (with ``name``, its key) is saved in every checkpoint and restored with it."""

    fn: Callable[[Any], None]
    every: int = 0
    at_end: bool = False
    name: str | None = None
    state: Stateful | None = None

    def __post_init__(self):
        require(self.every >= 0, "hook every must be >= 0")
        require((self.name is None) == (self.state is None), "a hook's saved state needs a name")


class Loop:
    """The harness of one run (module doc). ``config`` is the job's configuration dataclass;
    ``steps`` the run's length; a relative ``checkpoint.directory`` is inside ``output_dir``."""

    def __init__(self, config: Any, output_dir: str | Path, *, steps: int, checkpoint: CheckpointConfig,
                 logging_config: LoggingConfig, may_change: Sequence[str], what: str,
                 max_steps_this_run: int | None = None, progress: str = "start"):
        self.config, self.steps, self.what = config, steps, what
        self.folder = RunFolder(output_dir)
        self.folder.path.mkdir(parents=True, exist_ok=True)
        self.may_change, self.max_steps_this_run = tuple(may_change), max_steps_this_run
        self.logging_config, self._progress_desc = logging_config, progress
        self.checkpointer = Checkpointer(checkpoint.under(output_dir))
        self.hooks: list[Hook] = []
        self.state = LoopState()
        self.resumed = False
        self.steps_this_run = 0
        self._closing: list[Callable[[], None]] = []
        self._writers = self._progress = self._stop = None

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def running(self) -> bool:
        return self.step < self.steps

    @property
    def finished(self) -> bool:
        return self.step == self.steps

    def add_hook(self, hook: Hook) -> None:
        require(hook.name is None or all(h.name != hook.name for h in self.hooks),
                f"two hooks save their state as {hook.name!r}")
        self.hooks.append(hook)

    def on_close(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` when the loop closes (after the last step or on an error)."""
        self._closing.append(fn)

    # -- the run folder, restore and the writers ----------------------------------------------
    def restore(self, device_state: Any, state: S) -> Any:
        """The device state and ``state`` (with every hook's state) of the last intact
        checkpoint, or ``device_state`` and ``state`` as given for a fresh run; then writes
        ``config.yaml`` and opens the writers and the progress bar at ``self.step``. Refuses a
        configuration changed outside ``may_change`` and fewer ``steps`` than already run."""
        self.state = state
        restored = self.checkpointer.restore(abstract_target(device_state))
        if restored is not None:
            host = restored.host
            require_unchanged(host["config"], self.config, self.may_change, f"{self.what} in {self.folder.path}")
            require(self.steps >= host["step"],
                    f"steps {self.steps} is below the {host['step']} steps already run in {self.folder.path}")
            device_state, self.state = restored.state, type(state).from_json(host)
            for hook in self.hooks:
                if hook.state is not None:
                    hook.state.load_state(host[hook.name])
            self.resumed = True
            log.info("resumed at step %d", self.step)
        self.state.config = to_dict(self.config)  # what it runs under from now on
        save_config(self.config, self.folder.config_file)  # after the check: a refused change leaves it
        self._writers = make_writers(self.logging_config, self.folder.path, self.step, to_dict(self.config))
        self._stop = distributed.StopSignal()
        from tqdm import tqdm

        self._progress = tqdm(total=self.steps, initial=self.step, desc=self._progress_desc, unit="step",
                              disable=not (self.logging_config.progress and jax.process_index() == 0))
        return device_state

    def write(self, stream: str, record: dict[str, Any], step: int | None = None) -> None:
        """One line of ``stream`` at ``step`` (default: the current step); process 0 writes."""
        self._writers.write(stream, self.step if step is None else step, record)

    def phase(self, name: str) -> None:
        """Name the phase running now (the progress bar's description)."""
        self._progress.set_description(name)

    # -- steps ------------------------------------------------------------------------------------
    def run_hooks(self, info: Any, force: bool = False) -> None:
        """Every periodic hook due at ``self.step`` (with ``force``: every one with an interval)."""
        for hook in self.hooks:
            if hook.every > 0 and not hook.at_end and (force or self.step % hook.every == 0):
                hook.fn(info)

    def advance(self, **postfix: str) -> None:
        """Count the step just done (progress bar with ``postfix``)."""
        self.state.step += 1
        self.steps_this_run += 1
        self._progress.update(1)
        if postfix:
            self._progress.set_postfix(**postfix)

    def checkpoint(self, device_state: Any) -> bool:
        """After ``advance``: save ``device_state`` and the loop state when due, and say
        whether the run stops here (its last step, an agreed stop signal, or
        ``max_steps_this_run`` steps done), with a checkpoint in each case."""
        last = (self._stop.agreed() or self.finished
                or self.steps_this_run == self.max_steps_this_run)
        if last or self.checkpointer.should_save(self.step):
            host = {**self.state.to_json(), **{h.name: h.state.state() for h in self.hooks if h.state is not None}}
            self.checkpointer.save(self.step, device_state, host)
        return last

    # -- the end ----------------------------------------------------------------------------------
    def run_end_hooks(self, summary: dict[str, Any]) -> None:
        """Every ``at_end`` hook, on every process, with the run's summary (they may add to it)."""
        for hook in self.hooks:
            if hook.at_end:
                hook.fn(summary)

    def write_result(self, summary: dict[str, Any]) -> None:
        if distributed.is_primary():
            self.folder.write_result(summary)

    def __enter__(self) -> "Loop":
        return self

    def __exit__(self, *exc) -> None:
        if self._stop is not None:
            self._stop.restore()
            self._progress.close()
            self._writers.close()
        self.checkpointer.close()
        for fn in self._closing:
            fn()
