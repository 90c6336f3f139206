"""The ``train`` job: Fast-Slow Training, with weights-only RL and context-only GEPA as modes.

One cycle, every ``fast.every`` (T) RL steps (spec, section 2)::

    fast   (modes gepa, fst): a GEPA round against the current weights; its anchor set is the
           problems of the next T batches (peeked, not consumed); it starts from the previous
           cycle's top-K, re-scored under the current weights, and keeps the new top-K.
    slow   (every step): G rollouts per problem with the K contexts mixed inside each group
           (G/K each), advantages per problem across all of them, one optimizer step on
           CISPO + beta * KL (mode rl: the fixed original prompt; mode gepa: no update).

The mode (``fst_jax.runs.MODES``) chooses the phases: ``_Trainer.fast_round``, ``rollout`` and
``slow_step``; the harness (``fst_jax.loop``) runs the evaluation, the weights' export and the
figures as hooks, beside any a caller passes. All modes read the same problems in the same order
with the same seeds. The run folder (``fst_jax.runs.RunFolder``) holds
``config.yaml``, ``steps.jsonl`` (one line per RL step), ``gepa.jsonl`` (one line per GEPA
round: budget, kept contexts, and every proposal with its text and minibatch scores),
TensorBoard events, ``checkpoints/`` (train state + host state at one step), plots,
``contexts.json`` (the contexts kept) and ``result.json``; with ``export_hf`` also ``hf/``
(the trained weights as a Hugging Face folder). Rerunning the same command resumes from the last
intact checkpoint and follows the same trajectory; SIGTERM saves a checkpoint and stops.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fst_jax.checkpoint import CheckpointConfig
from fst_jax.config import require
from fst_jax.data import DataConfig, ProblemStream
from fst_jax.evaluation import EvaluationConfig, EvaluationHook
from fst_jax.fast.candidates import Member
from fst_jax import distributed
from fst_jax.fast.optimizer import GEPAConfig, run_gepa_round
from fst_jax.jobs.preflight import TargetConfig
from fst_jax.fast.reflection import (BatchedLM, ReflectionError, Reply, estimate_tokens, make_reflection_lm,
                                     reflect_batch)
from fst_jax.loop import Hook, Loop, LoopState, host_floats
from fst_jax.metrics import LoggingConfig
from fst_jax.models.loading import load_model
from fst_jax.padding import pow2
from fst_jax.report.figures import plot_run
from fst_jax.rl.batch import to_global
from fst_jax.rl.train_step import LearnerConfig, init_train_state, make_train_step
from fst_jax.rollout import Rollout, rollout, sampling_weights
from fst_jax.runs import EVAL, EVAL_PROBLEMS, GEPA, MODES, STEPS, RunFolder
from fst_jax.sampling import Sampler, SamplingConfig
from fst_jax.sharding import MeshConfig, make_mesh
from fst_jax.tasks import Task, make_task
from fst_jax.tasks.rewards import FunctionScorer, RewardConfig, RewardPool

log = logging.getLogger(__name__)

# What a resumed run may change: the number of steps (to extend it), where it lives, how it logs,
# checkpoints and is laid out on devices (the sampler's weight gathering and the shared-prefix or
# dense learner: equal results to rounding), and the dry run's target; anything else refuses.
RESUMABLE_CHANGES = ("steps", "output_dir", "logging", "checkpoint", "mesh", "sampling.gather_weights",
                     "learner.shared_prefix", "target")


@dataclasses.dataclass(frozen=True)
class FastConfig:
    """The fast channel: a GEPA round every ``every`` RL steps (T); ``gepa.top_k`` is the
    population K carried between rounds and mixed into every group; ``gepa.max_metric_calls``
    is the search budget of one round, re-scoring the K carried contexts on the anchor set (up
    to ``problems_per_step * every`` problems) comes on top unless
    ``gepa.rescoring_counts_toward_budget``; ``TrainJob`` refuses a round that cannot afford
    ``gepa.min_proposals`` proposals (``GEPAConfig.require_affordable``)."""

    every: int = 6
    gepa: GEPAConfig = GEPAConfig(max_proposals=400)

    def __post_init__(self):
        require(self.every >= 1, "every must be >= 1")
        # Proposals whose reflection fails score nothing new, so a metric-call budget alone
        # may never run out: every round of the loop needs a bound that always advances.
        require(self.gepa.max_proposals is not None or self.gepa.max_seconds is not None,
                "gepa.max_proposals or gepa.max_seconds must be set (a round whose proposals all "
                "fail spends no metric calls)")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage of a task schedule (continual learning): ``steps`` RL steps on ``task``."""

    task: str
    steps: int
    task_options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        require(self.steps >= 1, "steps must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """One training run. ``model``: ``smollm2-135m-instruct`` (bundled), a local HF folder, or
    ``tiny:<family>`` (a random tiny model with the byte tokenizer, for smoke runs).
    ``task_options`` go to the task's constructor; among them ``seed_context`` (GEPA's seed)
    and ``original_prompt`` (the fixed prompt of mode ``rl``). ``samples_per_problem`` is G.
    ``schedule`` (continual learning) replaces ``task``/``task_options`` by stages run in order,
    their steps adding up to ``steps``; the population carries across a switch (GEPA is seeded
    with the first stage's seed context once), a GEPA round opens every stage, and mode ``rl``
    uses each stage's own original prompt.
    A relative ``checkpoint.directory`` is inside ``output_dir``."""

    mode: str = "fst"  # one of fst_jax.runs.MODES
    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    remat: bool = False  # rematerialise each layer in the backward pass (large models)
    task: str = "arithmetic"
    task_options: dict = dataclasses.field(default_factory=dict)
    schedule: tuple[StageConfig, ...] = ()
    steps: int = 60
    problems_per_step: int = 8
    samples_per_problem: int = 8
    seed: int = 0
    output_dir: str = "runs/fst"
    export_hf: bool = True
    data: DataConfig = DataConfig()
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=128, temperature=1.0)
    learner: LearnerConfig = LearnerConfig()
    fast: FastConfig = FastConfig()
    rewards: RewardConfig = RewardConfig()
    eval: EvaluationConfig = EvaluationConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig(save_every_steps=6)
    logging: LoggingConfig = LoggingConfig()
    target: TargetConfig = TargetConfig()  # the devices --dry-run checks (fst_jax.jobs.preflight)

    def __post_init__(self):
        require(self.mode in MODES, f"mode {self.mode!r} is not one of {tuple(MODES)}")
        require(self.steps >= 1 and self.problems_per_step >= 1, "steps and problems_per_step must be >= 1")
        require(self.samples_per_problem >= 2, "samples_per_problem must be >= 2 (advantages need a group)")
        require(self.dtype in ("float32", "bfloat16"), "dtype must be float32 or bfloat16")
        require(not self.schedule or sum(st.steps for st in self.schedule) == self.steps,
                "steps must equal the sum of the schedule's stage steps")
        K = self.fast.gepa.top_k
        require(self.mode == "rl" or self.samples_per_problem % K == 0,
                f"samples_per_problem must be divisible by fast.gepa.top_k (K={K}): each context "
                f"gets G/K rollouts of every problem")
        gepa, sampling = self.fast.gepa, self.sampling
        if self.evolves_contexts:
            gepa.require_affordable(anchor_size=self.problems_per_step * self.fast.every, carried=K)
        if self.evolves_contexts and gepa.reflection.backend == "policy":
            # The policy's meta-prompt holds the current context and one output per minibatch
            # problem (plus problems and feedback, not counted): a lower bound on its length.
            context = gepa.reflection.max_context_tokens or sampling.max_context_tokens
            least = context + gepa.minibatch_size * sampling.max_new_tokens + estimate_tokens(gepa.reflection.template)
            require(max(sampling.prompt_buckets) >= least,
                    f"sampling.prompt_buckets' largest bucket {max(sampling.prompt_buckets)} cannot hold the policy "
                    f"reflector's meta-prompt (at least {least} tokens: a context of up to {context} tokens, "
                    f"{gepa.minibatch_size} outputs of up to {sampling.max_new_tokens} tokens and the template); "
                    f"add a bucket of {pow2(2 * least)} or more")

    def stages(self) -> tuple[StageConfig, ...]:
        """The schedule, or the single stage of ``task`` for ``steps``."""
        return self.schedule or (StageConfig(self.task, self.steps, self.task_options),)

    @property
    def trains_weights(self) -> bool:
        return MODES[self.mode].trains_weights

    @property
    def evolves_contexts(self) -> bool:
        return MODES[self.mode].evolves_contexts


def finished(job: TrainJob) -> bool:
    """Whether ``job``'s run folder holds its finished run (with ``hf/`` when it exports)."""
    return RunFolder(job.output_dir).finished(job.steps, job.trains_weights and job.export_hf)


class _Stage:
    """A schedule stage at run time: its task, problem stream, reward pool and step range.
    ``scorer`` scores through the pool, each process its own share of
    the rows (``distributed.scored_by_slices``), for the rollouts and the GEPA rounds alike."""

    def __init__(self, cfg: StageConfig, start: int, job: TrainJob):
        self.task = make_task(cfg.task, **cfg.task_options)
        self.name, self.start, self.end = cfg.task, start, start + cfg.steps
        made = self.task.examples("train", job.data.train_examples, seed=job.data.seed)
        self.stream = ProblemStream(distributed.same_examples(made, f"{cfg.task} train"),
                                    job.problems_per_step, job.data.shuffle_seed)
        self.pool = RewardPool(self.task, job.rewards)
        self.scorer = FunctionScorer(self.task, distributed.scored_by_slices(self.pool.score))


def _build_stages(job: TrainJob) -> list[_Stage]:
    stages, start = [], 0
    for cfg in job.stages():
        stages.append(_Stage(cfg, start, job))
        start += cfg.steps
    return stages


def fill_slots(members: list[Member], k: int) -> list[Member]:
    """``k`` context slots from the ranked members (best first); a population smaller than
    ``k`` fills the remaining slots by repeating members in rank order."""
    if len(members) < k:
        log.info("population has %d members for %d slots: filling by rank", len(members), k)
    return [members[i % len(members)] for i in range(k)]


def _unique(examples):
    seen, out = set(), []
    for ex in examples:
        if ex.id not in seen:
            seen.add(ex.id)
            out.append(ex)
    return out


def _reflection_on_primary(cfg, reflection_fn) -> BatchedLM | None:
    """With several processes and a reflection LM outside the policy (an endpoint, a callable,
    a replay file): process 0 alone calls it and broadcasts the replies, failures included,
    so every process's GEPA round proceeds in lockstep. None otherwise (the round builds its
    own LM; the policy backend samples through the global sampler on every process)."""
    if jax.process_count() == 1 or (cfg.backend == "policy" and cfg.cache_mode != "replay"):
        return None
    lm = make_reflection_lm(cfg, fn=reflection_fn) if distributed.is_primary() else None

    def batch(prompts, seeds):
        out = reflect_batch(lm, prompts, seeds) if lm is not None else []
        shared = distributed.broadcast_host_object(
            [[o.text, o.tokens] if isinstance(o, Reply) else str(o) for o in out])
        return [Reply(*o) if isinstance(o, list) else ReflectionError(o) for o in shared]

    return BatchedLM(batch)


@dataclasses.dataclass
class TrainLoopState(LoopState):
    """The loop state saved with the weights: besides the step and config, ``data`` (each
    stage's problem-stream position) and ``population`` (the kept contexts, best first)."""

    data: list = dataclasses.field(default_factory=list)
    population: list[Member] = dataclasses.field(default_factory=list)

    @classmethod
    def from_json(cls, host: dict[str, Any]) -> "TrainLoopState":
        return cls(host["step"], host["config"], host["data"], [Member(**m) for m in host["population"]])


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What the train loop's hooks see at ``step``: the policy's sampling weights after ``step``
    updates, the contexts rollouts use from ``step`` on (``contexts[0]`` the best; mode rl: the
    original prompt), the stage's task and its original prompt."""

    step: int
    policy: Any
    contexts: list[str]
    task: Task
    original: str


class _Trainer:
    """One run's parts: the sampler over the base weights, the schedule's stages, the device
    state (``TrainState``; a step counter alone in mode gepa) and its train step, the
    evaluation; and the phases of a step (``fast_round``, ``rollout``, ``slow_step``)."""

    def __init__(self, job: TrainJob, reflection_fn: Callable[[str], str] | None):
        self.job, self.reflection_fn = job, reflection_fn
        self.mesh = make_mesh(job.mesh)
        log.info("process %d of %d; mesh %s over %d devices", jax.process_index(), jax.process_count(),
                 dict(self.mesh.shape), self.mesh.size)
        model, tokenizer = load_model(job.model, job.dtype, job.sampling.max_context_tokens, job.seed,
                                      job.remat)
        self.sampler = Sampler(model, tokenizer, job.sampling, self.mesh)
        self.base = self.sampler.params  # never donated: the frozen weights of mode gepa
        self.stages = _build_stages(job)
        self.seed_context = self.stages[0].task.seed_context
        self.evaluation = EvaluationHook(job.eval)
        for text in ([self.seed_context] + [st.task.original_prompt for st in self.stages]
                     + [t.original_prompt for t in self.evaluation.ood.values()]):
            self.sampler.tokenizer.encode_context(text)  # over-long: fail now, not mid-run
        if job.trains_weights:
            own = nnx.merge(self.sampler.graphdef, jax.tree.map(jnp.copy, self.base))
            self.graphdef, self.state = init_train_state(own, job.learner, self.mesh, job.seed)
            self.train_step = make_train_step(self.graphdef, self.state, job.learner, self.mesh)
        else:
            self.graphdef, self.state = self.sampler.graphdef, {"steps": jnp.zeros((), jnp.int32)}
        self.reflection_lm = _reflection_on_primary(job.fast.gepa.reflection, reflection_fn)

    def stage(self, step: int) -> _Stage:
        return next(st for st in self.stages if st.start <= step < st.end)

    def policy(self) -> Any:
        """The weights rollouts sample from now (mode gepa: the base weights themselves)."""
        return sampling_weights(self.state, self.job.learner) if self.job.trains_weights else self.base

    def contexts(self, members: list[Member], st: _Stage) -> list[str]:
        if not self.job.evolves_contexts:
            return [st.task.original_prompt]
        return [m.components["context"] for m in fill_slots(members, self.job.fast.gepa.top_k)]

    def fast_round(self, loop: Loop, st: _Stage, policy: Any) -> float:
        """A GEPA round at ``loop.step`` on the problems of the stage's next T batches, from the
        kept population (or the seed context); keeps the new top-K and logs the round.
        Returns its seconds."""
        job, step, T = self.job, loop.step, self.job.fast.every
        loop.phase("fast (GEPA)")
        t0 = time.perf_counter()
        anchor = _unique(ex for batch in st.stream.peek(min(T, st.end - step)) for ex in batch)
        seeds = loop.state.population or [{"context": self.seed_context}]
        result = run_gepa_round(
            self.sampler, policy, st.task, anchor, seeds,
            dataclasses.replace(job.fast.gepa, seed=job.fast.gepa.seed + step // T),
            policy_step=step, reflection_fn=self.reflection_fn, scorer=st.scorer,
            reflection_lm=self.reflection_lm)
        loop.state.population = result.members
        seconds = time.perf_counter() - t0
        loop.write(GEPA, {"task": st.name, **_round_record(result, step // T, seconds)})
        return seconds

    def rollout(self, loop: Loop, st: _Stage, policy: Any, contexts: list[str]) -> Rollout:
        """G rollouts of each of the stage's next problems, the contexts mixed in each group."""
        loop.phase("rollout")
        return rollout(self.sampler, policy, st.stream.next_batch(), contexts, self.job.samples_per_problem,
                       st.scorer, seed=(self.job.seed * 1_000_003 + loop.step) % 2**31,
                       advantage=self.job.learner.advantage)

    def slow_step(self, loop: Loop, ro: Rollout, seconds: dict[str, float]) -> dict[str, float]:
        """One optimizer step on the rollouts; its metrics (a skipped update is logged)."""
        loop.phase("update")
        t0 = time.perf_counter()
        self.state, m = self.train_step(self.state, to_global(ro.batch, self.mesh), timings=seconds,
                                        check_shared_prefix=loop.step == 0)
        metrics = host_floats(m)
        seconds["update"] = time.perf_counter() - t0 - seconds.get("reference", 0.0)
        if metrics["applied"] == 0:
            why = ("no group had reward variance (nothing to learn)" if metrics["tokens"] == 0
                   else "non-finite loss or gradients")
            log.warning("step %d: %s; update skipped (%d so far)", loop.step, why, int(metrics["skipped"]))
        return metrics

    def evaluate(self, loop: Loop, info: StepInfo) -> None:
        """The evaluation hook: ``EvaluationHook.run`` at ``loop.step``, logged to ``eval.jsonl``
        and its per-problem scores to ``eval_problems.jsonl``."""
        loop.phase("eval")
        t0 = time.perf_counter()
        record = self.evaluation.run(self.sampler, info.policy, self.base, info.task, info.contexts,
                                     info.original)
        loop.write(EVAL, {"mode": self.job.mode, "task": info.task.name, **record,
                          "seconds": time.perf_counter() - t0})
        loop.write(EVAL_PROBLEMS, {"mode": self.job.mode, "task": info.task.name, **self.evaluation.problems})

    def export(self, loop: Loop, summary: dict[str, Any]) -> None:
        """The export hook: a finished run's trained weights to ``hf/`` (every process gathers,
        process 0 writes)."""
        if loop.finished:
            from fst_jax.models.weights import save_hf_folder

            summary["hf_folder"] = str(save_hf_folder(
                nnx.merge(self.graphdef, sampling_weights(self.state, self.job.learner)),
                loop.folder.weights, self.sampler.tokenizer))


def run_train_job(job: TrainJob, *, reflection_fn: Callable[[str], str] | None = None,
                  max_steps_this_run: int | None = None, hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Run (or resume) ``job``; returns the summary also written to ``result.json``.

    ``reflection_fn`` feeds the "callable" reflection backend; ``max_steps_this_run`` stops
    (with a checkpoint) after that many steps of this invocation (tests, time-sliced runs).
    ``hooks`` run beside the built-in ones (evaluation every ``eval.every`` steps and at the
    end of every stage, the weights' export and the figures at the end); periodic ones get a
    ``StepInfo`` after the step's fast round, before its rollouts."""
    t = _Trainer(job, reflection_fn)
    loop = Loop(job, job.output_dir, steps=job.steps, checkpoint=job.checkpoint, logging_config=job.logging,
                may_change=RESUMABLE_CHANGES, what="the run", max_steps_this_run=max_steps_this_run)
    for st in t.stages:
        loop.on_close(st.pool.close)
    loop.add_hook(Hook(lambda info: t.evaluate(loop, info), every=job.eval.every, name="eval",
                       state=t.evaluation))
    for hook in hooks:
        loop.add_hook(hook)
    if job.export_hf and job.trains_weights:
        loop.add_hook(Hook(lambda summary: t.export(loop, summary), at_end=True))
    loop.add_hook(Hook(lambda summary: distributed.is_primary() and plot_run(loop.folder.path), at_end=True))
    with loop:
        t.state = loop.restore(t.state, TrainLoopState(data=[st.stream.state() for st in t.stages]))
        if loop.resumed:
            for st, data in zip(t.stages, loop.state.data, strict=True):
                st.stream.load_state(data)
        run_start = time.perf_counter()
        while loop.running:
            seconds: dict[str, float] = {}
            st, policy = t.stage(loop.step), t.policy()
            if job.evolves_contexts and ((loop.step - st.start) % job.fast.every == 0 or not loop.state.population):
                seconds["fast"] = t.fast_round(loop, st, policy)
            contexts = t.contexts(loop.state.population, st)
            loop.run_hooks(StepInfo(loop.step, policy, contexts, st.task, st.task.original_prompt))
            ro = t.rollout(loop, st, policy, contexts)
            seconds.update(ro.seconds)
            metrics = t.slow_step(loop, ro, seconds) if job.trains_weights else {}
            record = {"task": st.name, **_step_record(job.mode, ro, metrics, seconds, loop.step // job.fast.every)}
            loop.write(STEPS, record)
            loop.advance(reward=f"{record['reward_mean']:.3f}", kl=f"{record.get('kl', 0.0):.4f}")
            if loop.step == st.end:
                # every stage ends with an evaluation of its final weights on its own task (before
                # the next stage's task takes over at the same step); the run's last one included
                loop.run_hooks(StepInfo(loop.step, t.policy(), contexts, st.task, st.task.original_prompt),
                               force=True)
            loop.state.data = [s.stream.state() for s in t.stages]
            if loop.checkpoint(t.state):
                break
        wall_s = time.perf_counter() - run_start
    return _finish(job, loop, t, wall_s)


def _round_record(result, cycle: int, seconds: float) -> dict[str, Any]:
    pop = result.optimizer.population
    agg = pop.aggregate()
    return {"cycle": cycle, **result.budget.to_dict(), "stop_reason": result.stop_reason,
            "best_anchor_score": max(agg), "front_size": len(set().union(*pop.fronts())),
            "population_size": len(pop.members), "anchor_size": len(pop.instance_ids),
            "seconds": seconds,
            "contexts": [{"context": m.components["context"], "anchor_score": agg[m.id],
                          "origin": m.origin, "born_step": m.born_step} for m in result.members],
            "proposal_log": result.optimizer.history}


def _step_record(mode: str, ro, metrics: dict[str, float], seconds: dict[str, float],
                 cycle: int) -> dict[str, Any]:
    record: dict[str, Any] = {
        "mode": mode, "cycle": cycle, "reward_mean": float(ro.rewards.mean()),
        "reward_std": float(ro.rewards.std()), "kept_fraction": ro.kept_fraction(),
        "completion_tokens": int(ro.lengths.sum()),
        "truncated_fraction": float(1.0 - ro.finished.mean()),
        **{f"reward_context_{k}": r for k, r in enumerate(ro.reward_per_context())},
        **metrics,
        **{f"seconds_{phase}": s for phase, s in seconds.items()},
    }
    record["seconds_total"] = sum(seconds.values())
    return record


def _finish(job: TrainJob, loop: Loop, t: _Trainer, wall_s: float) -> dict[str, Any]:
    """The end hooks (weights' export, figures), the kept contexts and ``result.json``."""
    rows = loop.folder.rows(STEPS)
    last = rows[-job.fast.every:] if rows else []
    original = t.stage(max(loop.step - 1, 0)).task.original_prompt
    members = loop.state.population if job.evolves_contexts else [Member(0, {"context": original}, "original", [], 0)]
    summary = {
        "mode": job.mode, "steps_done": loop.step, "steps": job.steps, "wall_s_this_run": round(wall_s, 1),
        "reward_mean_last_cycle": float(np.mean([r["reward_mean"] for r in last])) if last else None,
        "kl_last": rows[-1].get("kl") if rows else None,
        "seconds_per_phase_last_cycle": {
            k[len("seconds_"):]: round(sum(r.get(k, 0.0) for r in last), 2)
            for k in sorted({k for r in last for k in r if k.startswith("seconds_")})},
        "contexts": [m.components["context"] for m in members],
    }
    loop.run_end_hooks(summary)
    if distributed.is_primary():
        loop.folder.write_contexts([dataclasses.asdict(m) for m in members])
    loop.write_result(summary)
    return summary
