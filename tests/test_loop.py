"""The run harness on a toy job (a counter as device state): hooks at their interval, forced and at
the end, each hook's state and the typed loop state through a checkpoint, the stop after
max_steps_this_run, a refused configuration change, the logs cut back on resume."""

import dataclasses

import jax.numpy as jnp
import pytest

from fst_jax.checkpoint import CheckpointConfig
from fst_jax.config import ConfigError
from fst_jax.loop import Hook, Loop, LoopState
from fst_jax.metrics import LoggingConfig


@dataclasses.dataclass(frozen=True)
class ToyJob:
    steps: int = 6
    lr: float = 0.5


@dataclasses.dataclass
class ToyState(LoopState):
    seen: list = dataclasses.field(default_factory=list)


class Counter:
    """A hook with its own saved state: how often it ran."""

    def __init__(self):
        self.calls: list[int] = []
        self.runs = 0

    def __call__(self, step):
        self.calls.append(step)
        self.runs += 1

    def state(self):
        return {"runs": self.runs}

    def load_state(self, state):
        self.runs = state["runs"]


def run(tmp_path, job: ToyJob, max_steps: int | None = None, save_every: int = 4):
    loop = Loop(job, tmp_path, steps=job.steps, checkpoint=CheckpointConfig(save_every_steps=save_every, async_save=False),
                logging_config=LoggingConfig(tensorboard=False, progress=False), may_change=("steps",),
                what="the toy run", max_steps_this_run=max_steps)
    counter, ends = Counter(), []
    loop.add_hook(Hook(counter, every=3, name="counter", state=counter))
    loop.add_hook(Hook(ends.append, at_end=True))
    with loop:
        device = loop.restore({"total": jnp.zeros(())}, ToyState())
        while loop.running:
            loop.run_hooks(loop.step)
            device = {"total": device["total"] + 1.0}
            loop.state.seen.append(loop.step)
            loop.write("steps", {"total": float(device["total"])})
            loop.advance()
            if loop.step == 4:
                loop.run_hooks(loop.step, force=True)
            if loop.checkpoint(device):
                break
    summary = {"steps_done": loop.step}
    loop.run_end_hooks(summary)
    loop.write_result(summary)
    return loop, counter, ends, float(device["total"])


def test_hooks_run_at_their_interval_when_forced_and_at_the_end(tmp_path):
    loop, counter, ends, total = run(tmp_path, ToyJob())
    assert counter.calls == [0, 3, 4] and total == 6.0 and loop.finished
    assert ends == [{"steps_done": 6}] and loop.folder.result() == {"steps_done": 6}
    assert [r["step"] for r in loop.folder.rows("steps")] == list(range(6))
    assert loop.folder.config_file.read_text().startswith("steps: 6")


def test_a_stopped_run_resumes_its_device_state_loop_state_and_hook_state_and_cuts_the_logs_back(tmp_path):
    first, counter, _, total = run(tmp_path, ToyJob(), max_steps=5)  # checkpoints at 4 and at 5
    assert (first.step, total, counter.runs) == (5, 5.0, 3)
    with open(first.folder.stream("steps"), "a") as f:
        f.write('{"step": 5, "total": -1}\n')  # a line the killed run wrote after its checkpoint
    again, counter, ends, total = run(tmp_path, ToyJob())
    assert again.resumed and total == 6.0 and again.state.seen == list(range(6))
    assert counter.runs == 3 and counter.calls == []  # restored; step 5 is not a multiple of 3
    assert [r["total"] for r in again.folder.rows("steps")] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert ends == [{"steps_done": 6}]


def test_resume_refuses_a_changed_configuration_and_fewer_steps_than_already_run(tmp_path):
    run(tmp_path, ToyJob(), max_steps=5)
    with pytest.raises(ConfigError, match="cannot resume the toy run .* changed at lr"):
        run(tmp_path, ToyJob(lr=0.1))
    with pytest.raises(ConfigError, match="steps 4 is below the 5 steps"):
        run(tmp_path, ToyJob(steps=4))
    loop, _, _, total = run(tmp_path, ToyJob(steps=8))  # steps may change: the run goes on
    assert (loop.step, total) == (8, 8.0)


def test_a_hook_state_needs_a_name_and_names_are_unique(tmp_path):
    with pytest.raises(ConfigError, match="needs a name"):
        Hook(print, every=1, state=Counter())
    loop = Loop(ToyJob(), tmp_path, steps=1, checkpoint=CheckpointConfig(), logging_config=LoggingConfig(),
                may_change=(), what="x")
    loop.add_hook(Hook(print, every=1, name="a", state=Counter()))
    with pytest.raises(ConfigError, match="two hooks"):
        loop.add_hook(Hook(print, every=2, name="a", state=Counter()))
    loop.checkpointer.close()
