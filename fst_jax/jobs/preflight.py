"""Preflight: the memory dry run of a ``TrainJob`` on its target devices (``fst-train --dry-run``).

``TargetConfig`` (the job's ``target`` field) says what the run will be launched on: ``devices``
(how many accelerators the mesh spans: 8 for 8 x H100, 32 for a TPU v5p-64 slice) and
``device_memory_gib`` (memory per device the job may use), and optionally ``architecture``, a
preset name from ``ARCHITECTURES`` for when the model folder is not on this machine.

``preflight(job)`` runs ``fst_jax.dryrun.dry_run`` on the job's model, learner and mesh for one
train batch of ``problems_per_step * samples_per_problem`` rows of ``target.prompt_tokens``
(default: the largest prompt bucket) ``+ max_new_tokens`` tokens, with the sampler's copy of the
base weights that the loop holds beside the train state (``sampler_weights``) and the sampler's
programs for the loop's largest requests (``generate_shapes``: the rollout, the evaluation's
largest chunk, the policy reflector's meta-prompts), and raises ``DryRunError`` when the total
exceeds ``device_memory_gib``. GEPA's scoring requests (one sample per prompt) are no larger than
the evaluation's and are not compiled separately.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from fst_jax.config import ConfigError, require, require_in_registry
from fst_jax.dryrun import GIB, GenerateShape, check_fits, dry_run
from fst_jax.models import configs
from fst_jax.models.configs import ModelConfig
from fst_jax.tpu import parse_topology

ARCHITECTURES: dict[str, ModelConfig] = {"qwen3-8b": configs.QWEN3_8B,
                                         "smollm2-135m": configs.SMOLLM2_135M}


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """The devices a run is meant for (read by ``--dry-run`` only): ``devices`` accelerators
    of ``device_memory_gib`` each (None: not stated, a dry run refuses); ``architecture``: a name
    in ``ARCHITECTURES`` used instead of reading the model folder's config.json;
    ``prompt_tokens``: the longest ``[context | task]`` prompt of a train row (None: the largest
    of ``sampling.prompt_buckets``, which may be far longer when a bucket exists only for GEPA's
    reflection prompts). ``topology``: a TPU slice (``v5p:2x2x2``, ``v6e:2x4``, see
    ``fst_jax.tpu``): the dry run compiles with the TPU compiler for it, ``devices`` must be its
    device count and ``device_memory_gib`` defaults to its chip's HBM."""

    devices: int = 1
    device_memory_gib: float | None = None
    architecture: str | None = None
    prompt_tokens: int | None = None
    topology: str | None = None

    def __post_init__(self):
        require(self.devices >= 1, "devices must be >= 1")
        require(self.device_memory_gib is None or self.device_memory_gib > 0,
                "device_memory_gib must be positive")
        require(self.prompt_tokens is None or self.prompt_tokens >= 1, "prompt_tokens must be >= 1")
        if self.architecture is not None:
            require_in_registry(self.architecture, ARCHITECTURES, "architecture")
        if self.topology is not None:
            slice_ = parse_topology(self.topology)
            require(self.devices == slice_.devices,
                    f"target.devices={self.devices} but topology {self.topology} has {slice_.devices}")

    @property
    def memory_gib(self) -> float | None:
        """``device_memory_gib``, else the HBM per device of ``topology``'s chip, else None."""
        if self.device_memory_gib is not None or self.topology is None:
            return self.device_memory_gib
        return parse_topology(self.topology).device_memory_bytes / GIB


def model_config(job) -> ModelConfig:
    """The architecture ``job`` would train, with the numerics its loader applies
    (``job.dtype`` compute, float32 storage, ``job.remat``: what ``load_model`` builds)."""
    from fst_jax.models.loading import TINY_PREFIX
    from fst_jax.models.tokenizer import ByteChatTokenizer

    if job.target.architecture is not None:
        return ModelConfig.from_hf(ARCHITECTURES[job.target.architecture].to_hf(), dtype=job.dtype,
                                   remat=job.remat)
    if job.model.startswith(TINY_PREFIX):
        return configs.tiny(job.model[len(TINY_PREFIX):], vocab_size=ByteChatTokenizer.vocab_size,
                            dtype=job.dtype, remat=job.remat)
    from fst_jax.models.bundled import SMOLLM2_NAME

    if job.model.lower() == SMOLLM2_NAME:
        return configs.SMOLLM2_135M.replace(dtype=job.dtype, remat=job.remat)
    cfg = Path(job.model).expanduser() / "config.json"
    if not cfg.exists():
        raise ConfigError(f"model {job.model!r}: no {cfg} on this machine; set target.architecture "
                          f"to one of {sorted(ARCHITECTURES)} to dry-run without the weights")
    return ModelConfig.from_hf(json.loads(cfg.read_text()), dtype=job.dtype, remat=job.remat)


def batch_shape(job) -> tuple[int, int]:
    """(rows, tokens) of the largest train batch the loop builds for ``job``."""
    s, prompt = job.sampling, job.target.prompt_tokens
    return (job.problems_per_step * job.samples_per_problem,
            (max(s.prompt_buckets) if prompt is None else prompt) + s.max_new_tokens)


def _largest_call(calls: list[list[str]], multiple: int) -> tuple[int, int]:
    """(distinct contexts, most prompts under one) of the call, among ``calls`` (each a list of
    its prompts' context labels), that ``slot_shape`` gives the most slots."""
    from fst_jax.sampling import slot_shape

    shapes = [(len(counts), max(counts.values())) for counts in map(Counter, calls)]
    return max(shapes, key=lambda shape: math.prod(slot_shape(*shape, multiple)))


def eval_requests(job) -> tuple[list[list[str]], int]:
    """One evaluation's sampler calls with the trained weights, each as its prompts' context
    labels (the best context and the original prompt on ``eval.num_examples`` examples, then
    each OOD task's examples, split as ``sampling.chunks`` splits them), and the most samples
    one prompt gets (greedy, ``eval.k`` and, without OOD, ``eval.kl_samples``: one request)."""
    from fst_jax.sampling import chunks

    ev = job.eval
    main = ["best", "original"] if job.evolves_contexts else ["original"]
    requests = [[c for _ in range(ev.num_examples) for c in main],
                [t for t in ev.ood_tasks for _ in range(ev.num_examples)]]
    calls = [labels[c.start:c.stop] for labels in requests if labels
             for c in chunks(len(labels), job.sampling.max_prompts_per_batch)]
    return calls, int(ev.greedy) + ev.k + (ev.kl_samples if ev.kl else 0)


def generate_shapes(job) -> tuple[GenerateShape, ...]:
    """The loop's largest sampler requests: the rollout (K contexts x ``problems_per_step``
    prompts x G/K samples), the evaluation's largest call (``eval_requests``: the trained
    weights' greedy, sampled and KL samples of a chunk of its prompts) and, for a policy
    reflector, ``parallel_proposals`` meta-prompts in the largest prompt bucket. A prompt is ``target.prompt_tokens`` (default: the
    largest bucket) long, its context up to ``sampling.max_context_tokens`` of it."""
    s, ev, gepa = job.sampling, job.eval, job.fast.gepa
    prompt = max(s.prompt_buckets) if job.target.prompt_tokens is None else job.target.prompt_tokens
    context = min(s.max_context_tokens, prompt - 1)
    K = gepa.top_k if job.evolves_contexts else 1
    shapes = [GenerateShape("rollout", K, job.problems_per_step, job.samples_per_problem // K,
                            context, prompt - context, s.max_new_tokens)]
    if ev.every > 0:
        calls, samples = eval_requests(job)
        contexts, prompts = _largest_call(calls, job.mesh.data_size(job.target.devices) * job.mesh.fsdp)
        shapes.append(GenerateShape("eval", contexts, prompts, samples, context, prompt - context,
                                    ev.max_new_tokens or s.max_new_tokens))
    if job.evolves_contexts and gepa.reflection.backend == "policy":
        shapes.append(GenerateShape("reflection", 1, gepa.parallel_proposals, 1, min(s.prompt_buckets),
                                    max(s.prompt_buckets), gepa.reflection.max_tokens))
    return tuple(shapes)


def preflight(job, timeout_s: float = 900.0) -> dict[str, Any]:
    """The dry-run report of ``job`` on ``job.target`` (see the module doc). Raises
    ``ConfigError`` when ``target.device_memory_gib`` is not set, ``DryRunError`` when the
    run does not fit (or the compile fails)."""
    t = job.target
    if t.memory_gib is None:
        raise ConfigError("target.device_memory_gib is not set: say how much memory each of the "
                          "target's devices has (e.g. target.device_memory_gib=72 for an H100 at "
                          "XLA's 90% memory fraction), or name a TPU slice (target.topology)")
    rows, tokens = batch_shape(job)
    # The loop keeps the sampler's base weights (frozen policy of mode gepa, KL and 2x2 base)
    # beside the train state: as many bytes per device as the weights, sharded the same way.
    report = dry_run(model_config(job), job.learner, job.mesh, t.devices, rows, tokens,
                     t.memory_gib, timeout_s=timeout_s, sampling=job.sampling,
                     generate=generate_shapes(job), sampler_copy=job.trains_weights,
                     topology=t.topology)
    report["batch_shape"] = [rows, tokens]
    if not job.trains_weights:
        report["note"] = f"mode {job.mode} trains no weights: the train step is never run"
    if t.topology is not None:
        from fst_jax.forecast import forecast

        report["forecast"] = forecast(job, report)
        out = Path(job.output_dir) / "dry_run.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        report["json"] = str(out)
    return check_fits(report, t.memory_gib)


def gepa_round_line(job) -> str | None:
    """One line on a GEPA round of ``job`` at its largest anchor set (``problems_per_step x
    fast.every`` problems, K carried contexts): the re-scoring's calls and how they are charged,
    a proposal's worst-case cost and the fewest proposals the budget buys (None: mode ``rl``).
    A round that cannot afford ``fast.gepa.min_proposals`` is refused when the job loads."""
    if not job.evolves_contexts:
        return None
    gepa = job.fast.gepa
    anchor = job.problems_per_step * job.fast.every
    rescore, search = gepa.round_budget(anchor, gepa.top_k)
    how = "charged to" if gepa.rescoring_counts_toward_budget else "on top of"
    budget = (f"max_metric_calls {gepa.max_metric_calls} ({search} for proposals)" if search is not None
              else "no max_metric_calls")
    least = gepa.least_proposals(anchor, gepa.top_k)
    buys = f"at least {least} proposals a round" if least is not None else "proposals bounded by other limits"
    return (f"GEPA round: anchor {anchor} problems, re-scoring {rescore} metric calls {how} {budget}; "
            f"a proposal costs at most {gepa.proposal_cost(anchor)}: {buys}")


def gib(n: int) -> float:
    return n / 1024 ** 3


def fits_line(report: dict[str, Any]) -> str:
    """One line: the verdict with total and limit in GiB."""
    verdict = "fits" if report["fits"] else "does NOT fit"
    return (f"{verdict}: {gib(report['total_bytes']):.2f} GiB of {gib(report['device_memory_bytes']):.2f} "
            f"GiB per device, {report['num_devices']} devices, batch {report['batch_shape'][0]} x "
            f"{report['batch_shape'][1]} tokens, {report['num_params'] / 1e9:.3g}B parameters")

