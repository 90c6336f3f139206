"""The ``train`` job: Fast-Slow Training, with weights-only RL and context-only GEPA as modes.

One cycle, every ``fast.every`` (T) RL steps (spec, section 2)::

    fast   (modes gepa, fst): a GEPA round against the current weights; its anchor set is the
           problems of the next T batches (peeked, not consumed); it starts from the previous
           cycle's top-K, re-scored under the current weights, and keeps the new top-K.
    slow   (every step): G rollouts per problem with the K contexts mixed inside each group
           (G/K each), advantages per problem across all of them, one optimizer step on
           CISPO + beta * KL (mode rl: the fixed original prompt; mode gepa: no update).

All modes read the same problems in the same order with the same seeds. The run folder holds
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
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fst_jax.checkpoint import CheckpointConfig, Checkpointer, abstract_target
from fst_jax.config import require, require_unchanged, save_config, to_dict
from fst_jax.data import DataConfig, ProblemStream
from fst_jax.evaluation import EvaluationConfig, EvaluationHook
from fst_jax.fast.candidates import Member
from fst_jax import distributed
from fst_jax.fast.optimizer import GEPAConfig, run_gepa_round
from fst_jax.jobs.preflight import TargetConfig
from fst_jax.fast.reflection import (BatchedLM, ReflectionError, Reply, estimate_tokens, make_reflection_lm,
                                     reflect_batch)
from fst_jax.metrics import LoggingConfig, make_writers
from fst_jax.models.loading import load_model
from fst_jax.padding import pow2
from fst_jax.report.figures import plot_run
from fst_jax.rl.batch import to_global
from fst_jax.rl.train_step import LearnerConfig, init_train_state, make_train_step
from fst_jax.rollout import rollout, sampling_weights
from fst_jax.runs import MODES, RunFolder
from fst_jax.sampling import Sampler, SamplingConfig
from fst_jax.sharding import MeshConfig, make_mesh
from fst_jax.tasks import make_task
from fst_jax.tasks.rewards import FunctionScorer, RewardConfig, RewardPool

log = logging.getLogger(__name__)

# What a resumed run may change: the number of steps (to extend it), where it lives, how it logs,
# checkpoints and is laid out on devices, and the dry run's target; anything else refuses.
RESUMABLE_CHANGES = ("steps", "output_dir", "logging", "checkpoint", "mesh", "target")


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


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Replicated scalars to floats (also when they span other processes' devices)."""
    return {k: float(np.asarray(v.addressable_data(0))) for k, v in metrics.items()}


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


def run_train_job(job: TrainJob, *, reflection_fn: Callable[[str], str] | None = None,
                  max_steps_this_run: int | None = None) -> dict[str, Any]:
    """Run (or resume) ``job``; returns the summary also written to ``result.json``.

    ``reflection_fn`` feeds the "callable" reflection backend; ``max_steps_this_run`` stops
    (with a checkpoint) after that many steps of this invocation (tests, time-sliced runs)."""
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(job.mesh)
    log.info("process %d of %d; mesh %s over %d devices", jax.process_index(), jax.process_count(),
             dict(mesh.shape), mesh.size)
    model, tokenizer = load_model(job.model, job.dtype, job.sampling.max_context_tokens, job.seed,
                                  job.remat)
    sampler = Sampler(model, tokenizer, job.sampling, mesh)
    base = sampler.params  # never donated: the frozen weights of mode gepa
    stages = _build_stages(job)
    seed_context, original = stages[0].task.seed_context, stages[0].task.original_prompt
    hook = EvaluationHook(job.eval)
    for text in ([seed_context] + [st.task.original_prompt for st in stages]
                 + [t.original_prompt for t in hook.ood.values()]):
        sampler.tokenizer.encode_context(text)  # over-long: fail now, not mid-run
    cfg = job.learner
    if job.trains_weights:
        own = nnx.merge(sampler.graphdef, jax.tree.map(jnp.copy, base))
        graphdef, state = init_train_state(own, cfg, mesh, job.seed)
        train_step = make_train_step(graphdef, state, cfg, mesh)
    else:
        graphdef, state = sampler.graphdef, {"steps": jnp.zeros((), jnp.int32)}
    ckpt = Checkpointer(job.checkpoint.under(out))
    host = _host_state(job, 0, stages, hook, [])
    restored = ckpt.restore(abstract_target(state))
    if restored is not None:
        state, host = restored.state, restored.host
        require_unchanged(host["config"], job, RESUMABLE_CHANGES, f"the run in {out}")
        require(job.steps >= host["step"], f"steps {job.steps} is below the {host['step']} steps already run in {out}")
        for st, data in zip(stages, host["data"], strict=True):
            st.stream.load_state(data)
        hook.load_state(host["eval"])
        log.info("resumed at step %d", host["step"])
    save_config(job, out / "config.yaml")  # after the resume check: a refused change leaves it as it was
    step = host["step"]
    members = [Member(**m) for m in host["population"]]
    writers = make_writers(job.logging, out, step, to_dict(job))
    K, G, T = job.fast.gepa.top_k, job.samples_per_problem, job.fast.every
    reflection_lm = _reflection_on_primary(job.fast.gepa.reflection, reflection_fn)
    stop = distributed.StopSignal()
    progress = _progress(job, step)
    run_start, this_run = time.perf_counter(), 0
    try:
        while step < job.steps:
            seconds: dict[str, float] = {}
            st = next(st for st in stages if st.start <= step < st.end)
            task, original = st.task, st.task.original_prompt
            policy = sampling_weights(state, cfg) if job.trains_weights else base
            if job.evolves_contexts and ((step - st.start) % T == 0 or not members):
                progress.set_description("fast (GEPA)")
                t0 = time.perf_counter()
                anchor = _unique(ex for batch in st.stream.peek(min(T, st.end - step)) for ex in batch)
                seeds = members or [{"context": seed_context}]
                result = run_gepa_round(
                    sampler, policy, task, anchor, seeds,
                    dataclasses.replace(job.fast.gepa, seed=job.fast.gepa.seed + step // T),
                    policy_step=step, reflection_fn=reflection_fn, scorer=st.scorer,
                    reflection_lm=reflection_lm)
                members = result.members
                seconds["fast"] = time.perf_counter() - t0
                writers.write("gepa", step, {"task": st.name,
                                             **_round_record(result, step // T, seconds["fast"])})
            contexts = ([m.components["context"] for m in fill_slots(members, K)]
                        if job.evolves_contexts else [original])
            if hook.due(step):
                _evaluate(hook, writers, progress, step, job.mode, sampler, policy, base, task,
                          contexts, original)
            progress.set_description("rollout")
            ro = rollout(sampler, policy, st.stream.next_batch(), contexts, G, st.scorer,
                         seed=(job.seed * 1_000_003 + step) % 2**31, advantage=cfg.advantage)
            seconds.update(ro.seconds)
            metrics: dict[str, float] = {}
            if job.trains_weights:
                progress.set_description("update")
                t0 = time.perf_counter()
                state, m = train_step(state, to_global(ro.batch, mesh), timings=seconds)
                metrics = _floats(m)
                seconds["update"] = time.perf_counter() - t0 - seconds.get("reference", 0.0)
                if metrics["applied"] == 0:
                    why = ("no group had reward variance (nothing to learn)" if metrics["tokens"] == 0
                           else "non-finite loss or gradients")
                    log.warning("step %d: %s; update skipped (%d so far)", step, why,
                                int(metrics["skipped"]))
            record = {"task": st.name, **_step_record(job.mode, ro, metrics, seconds, step // T)}
            writers.write("steps", step, record)
            step += 1
            this_run += 1
            if step == st.end and job.eval.every > 0:
                # every stage ends with an evaluation of its final weights on its own task (before
                # the next stage's task takes over at the same step); the run's last one included
                _evaluate(hook, writers, progress, step, job.mode, sampler,
                          sampling_weights(state, cfg) if job.trains_weights else base, base, task,
                          contexts, original)
            host = _host_state(job, step, stages, hook, members)
            progress.update(1)
            progress.set_postfix(reward=f"{record['reward_mean']:.3f}",
                                 kl=f"{record.get('kl', 0.0):.4f}")
            last = stop.agreed() or step == job.steps or this_run == max_steps_this_run
            if last or ckpt.should_save(step):
                ckpt.save(step, state, host)
            if last:
                break
    finally:
        stop.restore()
        progress.close()
        ckpt.close()
        writers.close()
        for st in stages:
            st.pool.close()
    return _finish(job, out, step, members, original, graphdef, state, sampler.tokenizer,
                   time.perf_counter() - run_start)


def _host_state(job: TrainJob, step: int, stages: list[_Stage], hook: EvaluationHook,
                members: list[Member]) -> dict[str, Any]:
    """The loop's host state saved with the weights: the step, each stage's data position, the
    evaluation's running maxima, the population, and the configuration it ran under."""
    return {"step": step, "data": [st.stream.state() for st in stages], "eval": hook.state(),
            "population": [dataclasses.asdict(m) for m in members], "config": to_dict(job)}


def _evaluate(hook, writers, progress, step, mode, sampler, policy, base, task, contexts,
              original) -> None:
    """One evaluation (``EvaluationHook.run``), logged to the "eval" stream and its per-problem
    scores to "eval_problems" (``EvaluationHook.problems``)."""
    progress.set_description("eval")
    t0 = time.perf_counter()
    record = hook.run(sampler, policy, base, task, contexts, original)
    writers.write("eval", step, {"mode": mode, "task": task.name, **record,
                                 "seconds": time.perf_counter() - t0})
    writers.write("eval_problems", step, {"mode": mode, "task": task.name, **hook.problems})


def _progress(job: TrainJob, step: int):
    from tqdm import tqdm

    return tqdm(total=job.steps, initial=step, desc="start", unit="step",
                disable=not (job.logging.progress and jax.process_index() == 0))


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


def _finish(job, out: Path, step: int, members, original, graphdef, state, tokenizer,
            wall_s: float) -> dict[str, Any]:
    """Plots, the kept contexts, the exported weights and ``result.json``."""
    from fst_jax.metrics import read_jsonl

    rows = read_jsonl(out / "steps.jsonl")
    last = rows[-job.fast.every:] if rows else []
    contexts = ([m.components["context"] for m in members] if job.evolves_contexts else
                [original])
    summary = {
        "mode": job.mode, "steps_done": step, "steps": job.steps, "wall_s_this_run": round(wall_s, 1),
        "reward_mean_last_cycle": float(np.mean([r["reward_mean"] for r in last])) if last else None,
        "kl_last": rows[-1].get("kl") if rows else None,
        "seconds_per_phase_last_cycle": {
            k[len("seconds_"):]: round(sum(r.get(k, 0.0) for r in last), 2)
            for k in sorted({k for r in last for k in r if k.startswith("seconds_")})},
        "contexts": contexts,
    }
    if job.export_hf and job.trains_weights and step == job.steps:
        from fst_jax.models.weights import save_hf_folder

        summary["hf_folder"] = str(save_hf_folder(  # every process gathers, process 0 writes
            nnx.merge(graphdef, sampling_weights(state, job.learner)), out / "hf", tokenizer))
    if jax.process_index() == 0:
        folder = RunFolder(out)
        folder.write_contexts([dataclasses.asdict(m) for m in (members or [Member(0, {"context": original},
                                                                                  "original", [], 0)])])
        plot_run(out)
        folder.write_result(summary)
    return summary
