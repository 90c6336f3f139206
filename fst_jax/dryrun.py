"""Memory dry run: will a learner config fit the target devices? Nothing is allocated.

``dry_run(model, learner, mesh, num_devices, batch_rows, seq_len, device_memory_gib)`` builds the
abstract ``TrainState`` (``jax.eval_shape``: shapes, dtypes and shardings, no weights) for the
target model and mesh, compiles the project's ``make_train_step`` ahead of time over
``num_devices`` fake CPU devices with that mesh shape, and reports bytes per device:

- ``weights`` (trained + frozen), ``reference`` (the KL reference copy), ``lora``, ``optimizer``
  and ``batch``: exact, from each array's shard shape under the project's sharding rules;
- ``train_step``: XLA's ``memory_analysis()`` of the step exactly as the loop calls it (with
  ``kl.beta > 0`` that includes the reference log-prob pass), compiled as one program
  (arguments, outputs, aliased donations, temporaries);
- ``sampler_weights``: the base weights the loop keeps for sampling beside the train state
  (``sampler_copy``);
- one ``<name>_prefill`` and ``<name>_decode`` program per ``GenerateShape`` (the rollout, the
  evaluation's largest request, the policy reflector's meta-prompts): the sampler's programs
  compiled for that request (``Sampler.compile_generate``), whose prompt caches, per-sample
  caches, logits and attention scores come on top of everything resident;
- ``total``: the largest peak of any program, each ``everything resident + its inputs that are
  not + outputs - aliased + temporaries``.

It raises ``DryRunError`` naming every part when ``total`` exceeds ``device_memory_gib``.

The compile runs in a subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=N``,
``JAX_PLATFORMS=cpu``) because JAX fixes the device count when it starts. Temporaries are the
CPU backend's figure for the same partitioned program: fusion differs on GPU/TPU, so treat them
as an estimate (weights and optimizer bytes are exact). The sampler is compiled with its layers
scanned (``unroll_layers`` false unless the config says otherwise), as it runs on an accelerator.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fst_jax.config import ConfigError, load_config, require, save_config
from fst_jax.models.configs import ModelConfig
from fst_jax.rl.train_step import LearnerConfig
from fst_jax.sampling import SamplingConfig
from fst_jax.sharding import MeshConfig

GIB = 1024 ** 3


class DryRunError(RuntimeError):
    """The configuration does not fit the device memory, or could not be compiled."""


@dataclasses.dataclass(frozen=True)
class GenerateShape:
    """One sampler request by size (``Sampler.compile_generate``): ``contexts`` distinct contexts
    of up to ``context_tokens`` tokens, ``prompts_per_context`` prompts under each of up to
    ``task_tokens`` more, ``samples`` completions per prompt of ``new_tokens`` tokens."""

    name: str = "rollout"
    contexts: int = 1
    prompts_per_context: int = 1
    samples: int = 1
    context_tokens: int = 1
    task_tokens: int = 1
    new_tokens: int = 1

    def __post_init__(self):
        require(re.fullmatch(r"[a-z_]+", self.name) is not None, "name must be lower-case letters and _")
        for f in ("contexts", "prompts_per_context", "samples", "context_tokens", "task_tokens",
                  "new_tokens"):
            require(getattr(self, f) >= 1, f"{f} must be >= 1")


@dataclasses.dataclass(frozen=True)
class DryRunSpec:
    """What the subprocess compiles: a model and learner on ``num_devices`` devices shaped by
    ``mesh``, for a train batch of ``batch_rows`` rows of ``seq_len`` tokens; the sampler's
    programs for each of ``generate`` under ``sampling``; ``sampler_copy``: the loop keeps a
    copy of the base weights for sampling beside the train state."""

    model: ModelConfig = ModelConfig()
    learner: LearnerConfig = LearnerConfig()
    mesh: MeshConfig = MeshConfig()
    num_devices: int = 1
    batch_rows: int = 1
    seq_len: int = 16
    sampling: SamplingConfig = SamplingConfig()
    generate: tuple[GenerateShape, ...] = ()
    sampler_copy: bool = False

    def __post_init__(self):
        require(len({g.name for g in self.generate}) == len(self.generate), "generate names must differ")
        require(self.num_devices >= 1, "num_devices must be >= 1")
        require(self.batch_rows >= 1 and self.seq_len >= 2, "batch_rows >= 1 and seq_len >= 2")
        inner = self.mesh.fsdp * self.mesh.tensor
        data = self.mesh.data_size(self.num_devices)
        require(data * inner == self.num_devices,
                f"mesh data={self.mesh.data} x fsdp={self.mesh.fsdp} x tensor={self.mesh.tensor} "
                f"does not fill {self.num_devices} devices")
        require(self.batch_rows % (data * self.mesh.fsdp) == 0,
                f"batch_rows={self.batch_rows} must be divisible by data*fsdp={data * self.mesh.fsdp}")
        require(self.batch_rows % self.learner.micro_batches == 0,
                f"batch_rows={self.batch_rows} must be divisible by "
                f"micro_batches={self.learner.micro_batches}")


def dry_run(model: ModelConfig, learner: LearnerConfig, mesh: MeshConfig, num_devices: int,
            batch_rows: int, seq_len: int, device_memory_gib: float, timeout_s: float = 900.0, *,
            sampling: SamplingConfig = SamplingConfig(), generate: tuple[GenerateShape, ...] = (),
            sampler_copy: bool = False) -> dict[str, Any]:
    """Bytes per device of the train state, the compiled train step and the sampler's programs
    for ``generate`` (see the module docstring). Returns a JSON-able dict: ``bytes`` (per part, per device), ``programs``
    (each compiled program's memory analysis), ``total_bytes``, ``device_memory_bytes``,
    ``fits`` (True), the mesh shape and the compile seconds. Raises ``DryRunError`` when the
    total exceeds ``device_memory_gib`` or the subprocess fails, ``ConfigError`` on a bad spec."""
    require(device_memory_gib > 0, "device_memory_gib must be positive")
    spec = DryRunSpec(model, learner, mesh, num_devices, batch_rows, seq_len, sampling,
                      tuple(generate), sampler_copy)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                   os.environ.get("XLA_FLAGS", ""))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        save_config(spec, path)
        try:
            proc = subprocess.run([sys.executable, "-m", "fst_jax.dryrun", str(path)], env=env,
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise DryRunError(f"dry-run compile did not finish in {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        raise DryRunError(f"dry-run compile failed (exit {proc.returncode}):\n"
                          f"{proc.stderr[-4000:]}")
    return check_fits(json.loads(proc.stdout.strip().splitlines()[-1]), device_memory_gib)


def check_fits(report: dict[str, Any], device_memory_gib: float) -> dict[str, Any]:
    """Add ``device_memory_bytes`` and ``fits`` to a measured report; raise ``DryRunError``
    naming every part when ``total_bytes`` exceeds ``device_memory_gib``."""
    require(device_memory_gib > 0, "device_memory_gib must be positive")
    limit = int(device_memory_gib * GIB)
    report = {**report, "device_memory_bytes": limit, "fits": report["total_bytes"] <= limit}
    if not report["fits"]:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in report["bytes"].items())
        temps = ", ".join(f"{name} temporaries {p['temp_size_in_bytes'] / GIB:.2f}"
                          for name, p in report["programs"].items())
        raise DryRunError(
            f"{report['model']} on {report['num_devices']} devices (mesh {report['mesh']}) needs "
            f"about {report['total_bytes'] / GIB:.2f} GiB per device, over the "
            f"{device_memory_gib} GiB configured. Per device (GiB): {parts}; {temps}. Shard "
            f"more (mesh.fsdp), or use micro_batches, logits_chunk, model.remat, LoRA or a "
            f"smaller batch.")
    return report


def format_report(report: dict[str, Any]) -> str:
    """A few human-readable lines (GiB per device) of a ``dry_run`` report."""
    lines = [f"mesh {report['mesh']}: {report['total_bytes'] / GIB:.2f} GiB per device of "
             f"{report['device_memory_bytes'] / GIB:.2f}"]
    lines += [f"  {k:<16} {v / GIB:8.3f} GiB" for k, v in report["bytes"].items()]
    for name, p in report["programs"].items():
        lines.append(f"  {name}: temporaries {p['temp_size_in_bytes'] / GIB:.3f} GiB, "
                     f"peak {p['peak_bytes'] / GIB:.3f} GiB")
    return "\n".join(lines)


# -- the subprocess side -------------------------------------------------------------------
def _shard_bytes(tree: Any) -> int:
    """Bytes on one device of a tree of ``jax.ShapeDtypeStruct`` with shardings (the largest
    shard; shards are equal under the project's divisible-or-replicated rules)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def _memory(compiled, resident: int, resident_args: int) -> dict[str, int]:
    """XLA's memory analysis of one compiled program, and its peak estimate: everything
    resident (state and batch, whether or not the program reads it), plus its arguments that
    are not (all but ``resident_args`` bytes of them), plus its outputs that do not reuse a
    donated input, plus its temporaries."""
    ma = compiled.memory_analysis()
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
             "temp_size_in_bytes", "generated_code_size_in_bytes")
    out = {n: int(getattr(ma, n)) for n in names}
    out["peak_bytes"] = (resident + max(0, out["argument_size_in_bytes"] - resident_args)
                         + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
                         + out["temp_size_in_bytes"])
    return out


def measure(spec: DryRunSpec) -> dict[str, Any]:
    """Compile and measure in this process (its devices must be ``spec.num_devices``)."""
    import time

    import jax
    import jax.numpy as jnp

    from fst_jax.checkpoint import abstract_target
    from fst_jax.models.transformer import init_model
    from fst_jax.rl.batch import TrainBatch, batch_shardings
    from fst_jax.rl.train_step import init_train_state, make_train_step
    from fst_jax.sharding import make_mesh, state_shardings

    devices = jax.devices()
    if len(devices) != spec.num_devices:
        raise ConfigError(f"this process has {len(devices)} devices, the spec {spec.num_devices}")
    mesh = make_mesh(spec.mesh, devices)
    box = {}

    def build():
        graphdef, state = init_train_state(init_model(spec.model), spec.learner, mesh)
        box["graphdef"] = graphdef
        return state

    abstract = jax.eval_shape(build)
    state = abstract_target(abstract, state_shardings(abstract, mesh))
    B, T = spec.batch_rows, spec.seq_len
    sh = batch_shardings(mesh)
    kinds = TrainBatch(tokens=jnp.int32, positions=jnp.int32, mask=jnp.bool_, completion_mask=jnp.bool_,
                       loss_mask=jnp.bool_,
                       sampler_logp=jnp.float32, ref_logp=jnp.float32, advantages=jnp.float32,
                       rewards=jnp.float32, group_ids=jnp.int32, context_ids=jnp.int32,
                       temperature=jnp.float32, completion_budget=jnp.int32)
    batch = jax.tree.map(
        lambda dt, s: jax.ShapeDtypeStruct((B, T) if len(s.spec) == 2 else (B,), dt, sharding=s),
        kinds, sh)
    programs, seconds = {}, {}
    t0 = time.perf_counter()
    step = make_train_step(box["graphdef"], abstract, spec.learner, mesh)
    programs["train_step"] = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    seconds["train_step"] = time.perf_counter() - t0
    parts = {"weights": _shard_bytes((state.params, state.frozen)),
             "reference": _shard_bytes(state.ref), "lora": _shard_bytes(state.lora),
             "optimizer": _shard_bytes(state.opt_state),
             "other_state": _shard_bytes((state.step, state.skipped, state.rng)),
             "batch": _shard_bytes(batch)}
    parts["sampler_weights"] = parts["weights"] if spec.sampler_copy else 0
    resident = sum(parts.values())
    programs = {"train_step": _memory(programs["train_step"], resident, resident)}
    if spec.generate:
        from flax import nnx

        from fst_jax.models.tokenizer import ByteChatTokenizer
        from fst_jax.sampling import Sampler

        cfg = spec.sampling
        if cfg.unroll_layers is None:  # the accelerator's choice, not this CPU's
            cfg = dataclasses.replace(cfg, unroll_layers=False)
        sampler = Sampler(nnx.eval_shape(lambda: init_model(spec.model)),
                          ByteChatTokenizer(cfg.max_context_tokens), cfg, mesh)
        # Full fine-tuning samples from the trained weights themselves; LoRA from a merged copy.
        held = _shard_bytes(sampler.params) if parts["lora"] == 0 else 0
        for g in spec.generate:
            t0 = time.perf_counter()
            compiled = sampler.compile_generate(g.contexts, g.prompts_per_context, g.samples,
                                                g.context_tokens, g.task_tokens, g.new_tokens)
            seconds[g.name] = time.perf_counter() - t0
            for phase, c in compiled.items():
                programs[f"{g.name}_{phase}"] = _memory(c, resident, held)
    m = spec.model
    model = f"{m.family} model ({m.num_layers} layers, hidden {m.hidden_size})"
    return {"model": model, "bytes": parts, "programs": programs,
            "total_bytes": max(p["peak_bytes"] for p in programs.values()),
            "mesh": dict(mesh.shape), "num_devices": spec.num_devices,
            "num_params": int(sum(math.prod(x.shape) for x in
                                  jax.tree.leaves((abstract.params, abstract.frozen)))),
            "compile_seconds": {k: round(v, 2) for k, v in seconds.items()},
            "backend": jax.default_backend()}


if __name__ == "__main__":
    print(json.dumps(measure(load_config(DryRunSpec, sys.argv[1]))))
