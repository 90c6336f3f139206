"""FST-distill, the paper's naive baseline: distil a finished run's evolved context into its
weights, then evaluate without any context.

Student: the run's weights, trained; teacher: a frozen copy of the same weights. Every step
samples ``samples_per_problem`` completions ``y`` of ``problems_per_step`` training problems
from the STUDENT prompted with the task's original prompt (the policy's own samples), then takes
one AdamW step on the exact per-token reverse KL over the vocabulary

    KL( pi_student(. | original, x, y<t) || pi_teacher(. | best evolved context, x, y<t) ),

averaged over completion tokens, gradients through the student only. The sequence-level
dependence of the samples on the student is not differentiated (the usual on-policy
distillation objective). Student rows ``[original prompt | y]`` and teacher rows
``[context prompt | y]`` are each left-padded to their own prompt bucket, so ``y`` starts at a
static column in each and the two sides' completion positions are sliced from their own hidden
states (``completion_hidden``). Logits are formed in chunks of positions
(``evaluation.chunked_exact_kl``), never ``[B, T, V]`` at once.

``run_distill`` runs on the harness (``fst_jax.loop``) and writes its run folder
(``fst_jax.runs``) ``<output_dir>/``: ``config.yaml``, ``steps.jsonl`` (per step: kl,
completion tokens, seconds...), ``eval.jsonl``, ``checkpoints/`` (student, optimizer state and
the problem stream's position, every ``checkpoint.save_every_steps`` steps, on SIGTERM and at
the end), ``result.json`` (kl first/last; pass@1 and mean@k of the run weights without context
before, of the student without context after, of the teacher with its context) and, with
``export_hf``, ``hf/``. Rerunning the same command resumes from the last checkpoint: the steps
after it are redone with the same problems and sampling seeds.

    fst-distill --config experiments/fst_distill_cpu.yaml
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from fst_jax import distributed
from fst_jax.checkpoint import CheckpointConfig
from fst_jax.config import ConfigError, load_config, require
from fst_jax.data import ProblemStream
from fst_jax.evaluation import EvaluationConfig, EvaluationHook, chunked_exact_kl, samples_to_rows
from fst_jax.jobs.train import RESUMABLE_CHANGES, TrainJob
from fst_jax.loop import Hook, Loop, LoopState, host_floats
from fst_jax.metrics import LoggingConfig
from fst_jax.rl.optimizer import OptimizerConfig, apply_if, learning_rate, make_optimizer
from fst_jax.runs import CONTEXT_MODES, EVAL, STEPS, RunFolder
from fst_jax.sampling import PromptBatch, Sampler, Samples
from fst_jax.sharding import batch_devices, batch_sharding, replicated, state_shardings
from fst_jax.tasks import make_task

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Distil ``run_dir``'s best context into its weights (see the module docstring).

    ``run_dir``: a finished run of mode fst (``hf/``, ``contexts.json``, ``config.yaml``) or
    gepa (no ``hf/``: its frozen weights are the run's ``model``); the task, data pool, mesh,
    dtype and prompt buckets are the run's. Sampling is unfiltered at ``temperature``.
    ``optimizer`` is the project's AdamW config (``rl.optimizer``). Evaluation runs before
    and after (and every ``eval.every`` steps if > 0) with the original prompt only;
    ``eval.kl`` there is the exact KL of the student to the run's weights."""

    run_dir: str = "runs/fst"
    output_dir: str = "runs/fst_distill"
    steps: int = 20
    problems_per_step: int = 4
    samples_per_problem: int = 2
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-5, warmup_steps=0)
    max_new_tokens: int = 96
    temperature: float = 1.0
    kl_chunk: int = 128  # positions whose [B, chunk, V] logits are formed at once
    seed: int = 0
    eval: EvaluationConfig = EvaluationConfig(num_examples=24, k=2)
    export_hf: bool = True
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig(save_every_steps=10)  # directory: under output_dir

    def __post_init__(self):
        require(bool(self.run_dir), "run_dir must name a finished fst run folder")
        require(bool(self.output_dir)
                and Path(self.output_dir).resolve() != Path(self.run_dir).resolve(),
                "output_dir must be set and differ from run_dir")
        require(self.steps >= 1, "steps must be >= 1")
        require(self.problems_per_step >= 1, "problems_per_step must be >= 1")
        require(self.samples_per_problem >= 1, "samples_per_problem must be >= 1")
        require(self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        require(self.temperature > 0, "temperature must be > 0 (the student's own samples)")
        require(self.kl_chunk >= 1, "kl_chunk must be >= 1")
        require(not self.eval.two_by_two, "eval.two_by_two must be false: there is one context "
                                          "here; result.json reports the teacher instead")


# -- the pure step ------------------------------------------------------------------------
@struct.dataclass
class DistillBatch:
    """One step's rows, leading axis ``B``: the student's ``[original prompt | y]`` and the
    teacher's ``[evolved-context prompt | y]`` (tokens, positions int32, mask bool), each prompt
    left-padded to its bucket so ``y`` starts at column ``width - N``; ``completion_mask`` bool
    ``[B, N]`` marks the real tokens of ``y``. Empty rows (all masks False) pad ``B``."""

    student_tokens: jax.Array
    student_positions: jax.Array
    student_mask: jax.Array
    teacher_tokens: jax.Array
    teacher_positions: jax.Array
    teacher_mask: jax.Array
    completion_mask: jax.Array


def distill_batch(samples: Samples, teacher_prompts: PromptBatch,
                  multiple: int = 1) -> DistillBatch:
    """The rows of ``samples`` under their own prompts (student) and under ``teacher_prompts``
    (the same problems with the teacher's context, one row per prompt, in order), rows padded to
    a multiple of ``multiple``."""
    if teacher_prompts.num_prompts != samples.prompts.num_prompts:
        raise ValueError(f"{teacher_prompts.num_prompts} teacher prompts for "
                         f"{samples.prompts.num_prompts} student prompts")
    s = samples_to_rows(samples, multiple)
    t = samples_to_rows(dataclasses.replace(samples, prompts=teacher_prompts), multiple)
    N = samples.tokens.shape[1]
    return DistillBatch(s.tokens, s.positions, s.mask, t.tokens, t.positions, t.mask,
                        np.asarray(s.loss_mask[:, -N:]))


def completion_hidden(model, tokens, positions, mask, completion_width: int) -> jax.Array:
    """Hidden states ``[B, N, D]`` that predict the ``N = completion_width`` last columns of
    the rows (column ``c`` is predicted from the hidden state at ``c - 1``)."""
    x, _ = model.hidden(tokens, positions, mask)
    start = tokens.shape[1] - completion_width - 1
    return x[:, start:start + completion_width]


def reverse_kl(graphdef: nnx.GraphDef, student: nnx.State, teacher: nnx.State,
               batch: DistillBatch, chunk: int = 128) -> tuple[jax.Array, jax.Array]:
    """(token mean of the exact ``KL(pi_student || pi_teacher)`` over ``batch``'s completion
    tokens, their count). Differentiable in ``student``; the teacher's side is stopped."""
    N = batch.completion_mask.shape[1]
    s_model, t_model = nnx.merge(graphdef, student), nnx.merge(graphdef, teacher)
    xs = completion_hidden(s_model, batch.student_tokens, batch.student_positions,
                           batch.student_mask, N)
    xt = jax.lax.stop_gradient(completion_hidden(
        t_model, batch.teacher_tokens, batch.teacher_positions, batch.teacher_mask, N))
    kl = chunked_exact_kl(s_model, t_model, xs, xt, chunk)
    m = batch.completion_mask
    count = m.sum()
    return jnp.where(m, kl, 0.0).sum() / jnp.maximum(count, 1), count


@struct.dataclass
class DistillState:
    """The student: ``params`` (all weights trained), AdamW ``opt_state``, int32 ``step``."""

    params: nnx.State
    opt_state: Any
    step: jax.Array


def init_distill_state(weights: nnx.State, optimizer: OptimizerConfig,
                       mesh: Mesh | None = None) -> DistillState:
    """A student starting from a copy of ``weights`` (which stay untouched)."""
    params = jax.tree.map(jnp.copy, weights)
    state = DistillState(params, make_optimizer(optimizer).init(params), jnp.zeros((), jnp.int32))
    return state if mesh is None else jax.device_put(state, state_shardings(state, mesh))


def make_distill_step(graphdef: nnx.GraphDef, state: DistillState, teacher: nnx.State,
                      optimizer: OptimizerConfig, mesh: Mesh | None = None, chunk: int = 128
                      ) -> Callable[[DistillState, nnx.State, DistillBatch],
                                    tuple[DistillState, dict]]:
    """``step(state, teacher, batch) -> (state, metrics)``, jitted, ``state`` donated (pass a
    host ``DistillBatch``; with ``mesh`` its rows, a multiple of ``data * fsdp``, are sharded).
    One AdamW step on ``reverse_kl``; a non-finite loss or gradient, or a batch without
    completion tokens, leaves the state unchanged (``applied`` 0). Metrics (float32): kl (the
    loss, before the update), tokens, grad_norm, lr, applied."""
    opt, schedule = make_optimizer(optimizer), learning_rate(optimizer)

    def step_fn(state: DistillState, teacher: nnx.State, batch: DistillBatch):
        grad_fn = jax.value_and_grad(reverse_kl, argnums=1, has_aux=True)
        (loss, count), grads = grad_fn(graphdef, state.params, teacher, batch, chunk)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (count > 0)

        params, opt_state = apply_if(ok, opt, grads, state.params, state.opt_state)
        metrics = {"kl": loss, "tokens": count.astype(jnp.float32), "grad_norm": grad_norm,
                   "lr": schedule(state.step), "applied": ok.astype(jnp.float32)}
        return DistillState(params, opt_state, state.step + ok.astype(jnp.int32)), metrics

    if mesh is None:
        return jax.jit(step_fn, donate_argnums=0)
    state_sh, rows = state_shardings(state, mesh), batch_sharding(mesh, 2)
    jitted = jax.jit(step_fn, in_shardings=(state_sh, state_shardings(teacher, mesh), rows),
                     out_shardings=(state_sh, replicated(mesh)), donate_argnums=0)
    return lambda state, teacher, batch: jitted(state, teacher, jax.device_put(batch, rows))


# -- the run folder -----------------------------------------------------------------------
@dataclasses.dataclass
class SourceRun:
    """A finished run folder as distillation reads it: its job, its kept contexts (best
    first) and its weights folder (None for a gepa run: the job's ``model``)."""

    folder: Path
    job: TrainJob
    contexts: list[str]
    weights: Path | None


def read_run(run_dir: str | Path) -> SourceRun:
    """Check and read ``run_dir``; ConfigError naming the missing piece and the path."""
    folder = RunFolder(run_dir)
    if not folder.config_file.is_file():
        raise ConfigError(f"run_dir {folder.path}: no config.yaml (not a run folder)")
    job = load_config(TrainJob, folder.config_file)
    if job.mode not in CONTEXT_MODES:
        raise ConfigError(f"run_dir {folder.path} is a mode {job.mode!r} run; distillation needs an "
                          f"evolved context (mode {' or '.join(CONTEXT_MODES)})")
    hf = folder.weights
    if job.trains_weights and not (hf / "config.json").is_file():
        raise ConfigError(f"run_dir {folder.path}: no exported weights in {hf} (unfinished run, or "
                          "export_hf was false)")
    if not folder.has_contexts():
        raise ConfigError(f"run_dir {folder.path}: no contexts.json (unfinished run)")
    contexts = folder.contexts()
    if not contexts:
        raise ConfigError(f"run_dir {folder.path}: contexts.json holds no context")
    return SourceRun(folder.path, job, contexts, hf if hf.is_dir() else None)


def load_sampler(run: SourceRun, cfg: DistillConfig) -> Sampler:
    """A sampler over the run's weights on the run's mesh: unfiltered sampling at
    ``cfg.temperature``, ``cfg.max_new_tokens`` new tokens, the run's prompt buckets."""
    from fst_jax.models.loading import TINY_PREFIX, load_model
    from fst_jax.models.weights import load_hf_folder
    from fst_jax.sharding import make_mesh

    job = run.job
    sampling = dataclasses.replace(job.sampling, max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.temperature, top_p=1.0, top_k=0)
    args = (job.dtype, sampling.max_context_tokens, job.seed)
    if run.weights is None:
        model, tokenizer = load_model(job.model, *args, remat=job.remat)
    elif job.model.startswith(TINY_PREFIX):  # hf/ holds no files for the byte tokenizer
        _, tokenizer = load_model(job.model, *args)
        _, model = load_hf_folder(run.weights, dtype=job.dtype, remat=job.remat)
    else:
        model, tokenizer = load_model(str(run.weights), *args, remat=job.remat)
    return Sampler(model, tokenizer, sampling, make_mesh(job.mesh))


# -- the job ------------------------------------------------------------------------------
def _scores(record: dict[str, float], k: int, suffix: str = "", extra: bool = True
            ) -> dict[str, float]:
    """From an ``EvaluationHook.run`` record: ``eval/mean@k`` and ``eval/pass@1`` of one context
    (read from the keys with ``suffix``), with ``extra`` also the OOD and KL values."""
    out = {key: record[key + suffix] for key in (f"eval/mean@{k}", "eval/pass@1")
           if key + suffix in record}
    if extra:
        out.update({key: v for key, v in record.items()
                    if key.startswith("eval/ood/") or key == "eval/kl_to_base"})
    return out


@dataclasses.dataclass
class DistillLoopState(LoopState):
    """The loop state saved with the student: besides the step and config, ``data`` (the
    problem stream's position) and the evaluation before distillation, ``teacher`` (the run's
    weights with the evolved context) and ``before`` (the same weights without it)."""

    data: dict = dataclasses.field(default_factory=dict)
    teacher: dict = dataclasses.field(default_factory=dict)
    before: dict = dataclasses.field(default_factory=dict)


def run_distill(cfg: DistillConfig, *, max_steps_this_run: int | None = None,
                hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Run (or resume) the distillation; returns the summary also written to ``result.json``.
    ``max_steps_this_run`` stops with a checkpoint after that many steps of this invocation
    (tests, time-sliced runs); the summary then has ``steps_done`` < ``steps``, no ``after``
    and no ``result.json`` is written. ``hooks`` run beside the evaluation every
    ``eval.every`` steps and the export at the end; periodic ones get the step."""
    run = read_run(cfg.run_dir)
    sampler = load_sampler(run, cfg)
    job = run.job
    stage = job.stages()[-1]  # with a schedule: the task the run ended on
    task = make_task(stage.task, **stage.task_options)
    original, evolved = task.original_prompt, run.contexts[0]
    if evolved == original:
        log.warning("the run's best context is the original prompt: nothing to distil")
    for text in (original, evolved):
        sampler.tokenizer.encode_context(text)  # over-long: fail now
    teacher, mesh = sampler.params, sampler.mesh
    state = init_distill_state(teacher, cfg.optimizer, mesh)
    step_fn = make_distill_step(sampler.graphdef, state, teacher, cfg.optimizer, mesh, cfg.kl_chunk)
    rows_multiple = batch_devices(mesh)
    stream = ProblemStream(task.examples("train", job.data.train_examples, seed=job.data.seed),
                           cfg.problems_per_step, job.data.shuffle_seed)
    evaluation, k = EvaluationHook(cfg.eval), cfg.eval.k
    loop = Loop(cfg, cfg.output_dir, steps=cfg.steps, checkpoint=cfg.checkpoint, logging_config=cfg.logging,
                may_change=RESUMABLE_CHANGES, what="the distillation", max_steps_this_run=max_steps_this_run,
                progress="eval")

    def evaluate(student) -> dict[str, float]:
        """The student without context (``eval.kl``: its exact KL to the run's weights)."""
        return _scores(evaluation.run(sampler, student, teacher, task, [original], original), k)

    def periodic(step: int) -> None:
        if step > 0:  # step 0: the evaluation before distillation
            t0 = time.perf_counter()
            loop.write(EVAL, {**evaluate(state.params), "seconds": time.perf_counter() - t0})

    def export(summary: dict[str, Any]) -> None:
        from fst_jax.models.weights import save_hf_folder

        summary["hf_folder"] = str(save_hf_folder(  # every process gathers, process 0 writes
            nnx.merge(sampler.graphdef, state.params), loop.folder.weights, sampler.tokenizer))

    loop.add_hook(Hook(periodic, every=cfg.eval.every, name="eval", state=evaluation))
    for hook in hooks:
        loop.add_hook(hook)
    if cfg.export_hf:
        loop.add_hook(Hook(export, at_end=True))
    after = None
    with loop:
        state = loop.restore(state, DistillLoopState(data=stream.state()))
        ls, start = loop.state, time.perf_counter()
        if loop.resumed:
            stream.load_state(ls.data)
        else:
            # The run's weights with [evolved] also score the original prompt: the teacher's
            # numbers and the student's before distillation (the same weights) in one evaluation.
            t0 = time.perf_counter()
            reference = EvaluationHook(dataclasses.replace(cfg.eval, kl=False)).run(
                sampler, teacher, teacher, task, [evolved], original)
            ls.teacher = _scores(reference, k, extra=False)
            ls.before = _scores(reference, k, "_original")
            if cfg.eval.kl:
                ls.before["eval/kl_to_base"] = 0.0  # the student is still the run's weights
            loop.write(EVAL, {**ls.before, "seconds": time.perf_counter() - t0,
                              **{f"teacher/{key}": v for key, v in ls.teacher.items()}})
        loop.phase("distill")
        while loop.running:
            loop.run_hooks(loop.step)
            t0 = time.perf_counter()
            problems = stream.next_batch()
            samples = sampler.generate(state.params,
                                       sampler.encode([(original, ex.prompt) for ex in problems]),
                                       n=cfg.samples_per_problem,
                                       seed=(cfg.seed * 1_000_003 + loop.step) % 2**31)
            teacher_prompts = sampler.encode([(evolved, ex.prompt) for ex in problems])
            batch = distill_batch(samples, teacher_prompts, rows_multiple)
            t1 = time.perf_counter()
            state, metrics = step_fn(state, teacher, batch)
            metrics = host_floats(metrics)
            t2 = time.perf_counter()
            if metrics["applied"] == 0:
                log.warning("step %d: non-finite loss or gradients, or no tokens; update skipped",
                            loop.step)
            loop.write(STEPS, {**metrics, "completion_tokens": int(samples.lengths.sum()),
                               "truncated_fraction": float(1.0 - samples.finished.mean()),
                               "seconds_sample": t1 - t0, "seconds_update": t2 - t1, "seconds_total": t2 - t0})
            loop.advance(kl=f"{metrics['kl']:.4f}")
            ls.data = stream.state()
            if loop.checkpoint(state):
                break
        if loop.finished:
            loop.phase("eval")
            t0 = time.perf_counter()
            after = evaluate(state.params)
            loop.write(EVAL, {**after, "seconds": time.perf_counter() - t0})
    rows = loop.folder.rows(STEPS) if distributed.is_primary() else []
    summary = {
        "run_dir": str(run.folder), "run_mode": job.mode, "task": stage.task, "steps": cfg.steps,
        "steps_done": loop.step, "kl_first": rows[0]["kl"] if rows else None,
        "kl_last": rows[-1]["kl"] if rows else None,
        "completion_tokens": sum(r["completion_tokens"] for r in rows),
        "before": ls.before, "after": after, "teacher": ls.teacher,
        "contexts": {"student": original, "teacher": evolved},
        "wall_s": round(time.perf_counter() - start, 1),
    }
    if not loop.finished:
        log.info("stopped at step %d of %d with a checkpoint; rerun to continue", loop.step, cfg.steps)
        return summary
    loop.run_end_hooks(summary)
    loop.write_result(summary)
    return summary
