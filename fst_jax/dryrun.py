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
  caches, logits and attention scores (and under FSDP the weights gathered whole,
  ``Sampler.gathers``) come on top of everything resident;
- ``total``: the largest peak of any program, each ``everything resident + its inputs that are
  not + outputs - aliased + temporaries``.

It raises ``DryRunError`` naming every part and the largest program when ``total`` exceeds
``device_memory_gib``. Each program also gets its cost per device (``_cost``): FLOPs by formula
(``fst_jax.roofline``; XLA's own count, which sees each loop body once, is reported beside it),
bytes, and on a TPU slice a roofline time from the chip's published peaks (``fst_jax.tpu``).

The compile runs in a subprocess (``JAX_PLATFORMS=cpu``) because JAX fixes the device count when
it starts. With ``topology`` (a TPU slice, e.g. ``v5p:2x2x2``) the devices are libtpu's for that
slice and the TPU compiler compiles every program, as it would on the pod. Without it they are
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` fake CPU devices: temporaries are then the
CPU backend's figure for the same partitioned program (fusion differs on GPU/TPU), an estimate;
weights and optimizer bytes are exact either way. ``compiler`` in the report says which. The sampler is compiled with its layers
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
from fst_jax.padding import bucket
from fst_jax.rl.train_step import LearnerConfig
from fst_jax.roofline import (decode_step_flops, kv_cache_bytes, prefill_flops, roofline_seconds,
                              train_step_flops)
from fst_jax.sampling import SamplingConfig, slot_shape
from fst_jax.sharding import MeshConfig, batch_devices
from fst_jax.tpu import parse_topology, require_libtpu, runtime_env

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
    copy of the base weights for sampling beside the train state; ``topology``: compile for that
    TPU slice with libtpu (``fst_jax.tpu``) instead of over fake CPU devices."""

    model: ModelConfig = ModelConfig()
    learner: LearnerConfig = LearnerConfig()
    mesh: MeshConfig = MeshConfig()
    num_devices: int = 1
    batch_rows: int = 1
    seq_len: int = 16
    sampling: SamplingConfig = SamplingConfig()
    generate: tuple[GenerateShape, ...] = ()
    sampler_copy: bool = False
    topology: str | None = None

    def __post_init__(self):
        if self.topology is not None:
            slice_ = parse_topology(self.topology)
            require(self.num_devices == slice_.devices,
                    f"topology {self.topology} has {slice_.devices} devices, not {self.num_devices}")
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
            batch_rows: int, seq_len: int, device_memory_gib: float | None,
            timeout_s: float = 900.0, *, sampling: SamplingConfig = SamplingConfig(),
            generate: tuple[GenerateShape, ...] = (), sampler_copy: bool = False,
            topology: str | None = None) -> dict[str, Any]:
    """Bytes per device of the train state, the compiled train step and the sampler's programs
    for ``generate`` (see the module docstring). Returns a JSON-able dict: ``bytes`` (per part,
    per device), ``programs`` (each compiled program's memory analysis and cost, see
    ``_cost``), ``total_bytes``, ``device_memory_bytes``, ``fits`` (True), the mesh shape,
    ``compiler`` and the compile seconds. With ``topology`` the TPU compiler (libtpu) compiles
    for that slice and ``device_memory_gib`` defaults to its chip's HBM. Raises ``DryRunError``
    when the total exceeds the memory or the subprocess fails, ``ConfigError`` on a bad spec or
    a missing libtpu."""
    if topology is not None:
        require_libtpu()
        slice_ = parse_topology(topology)
        device_memory_gib = device_memory_gib or slice_.device_memory_bytes / GIB
    require(device_memory_gib is not None and device_memory_gib > 0,
            "device_memory_gib must be positive (or name a TPU topology)")
    spec = DryRunSpec(model, learner, mesh, num_devices, batch_rows, seq_len, sampling,
                      tuple(generate), sampler_copy, topology)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                   os.environ.get("XLA_FLAGS", ""))
    if topology is None:
        flags = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
    # The TPU slice's devices come from libtpu's topology; the process itself stays on CPU.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags,
           **(runtime_env(slice_) if topology is not None else {})}
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
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if "refused" in report:
        raise DryRunError(f"{model.family} model on {num_devices} devices: {report['refused']}")
    return check_fits(report, device_memory_gib)


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
        worst = max(report["programs"], key=lambda k: report["programs"][k]["peak_bytes"])
        raise DryRunError(
            f"{report['model']} on {report['num_devices']} devices (mesh {report['mesh']}) needs "
            f"about {report['total_bytes'] / GIB:.2f} GiB per device ({worst}: "
            f"{report['total_bytes']} bytes), over the "
            f"{device_memory_gib} GiB configured. Per device (GiB): {parts}; {temps}. Shard "
            f"more (mesh.fsdp), or use micro_batches, logits_chunk, model.remat, LoRA or a "
            f"smaller batch.")
    return report


def format_report(report: dict[str, Any]) -> str:
    """A few human-readable lines (GiB per device) of a ``dry_run`` report."""
    lines = [f"{report['compiler']}, mesh {report['mesh']}: {report['total_bytes'] / GIB:.2f} GiB "
             f"per device of {report['device_memory_bytes'] / GIB:.2f}"]
    lines += [f"  {k:<16} {v / GIB:8.3f} GiB" for k, v in report["bytes"].items()]
    lines.append(f"  {'program':<18} {'temp GiB':>9} {'peak GiB':>9} {'TFLOP':>9} {'XLA TFLOP':>9} "
                 f"{'XLA GB':>8} {'coll. GB':>8} {'roofline s':>10}   (per device; XLA counts loop bodies once)")
    for name, p in report["programs"].items():
        t = p.get("roofline_seconds")
        lines.append(f"  {name:<18} {p['temp_size_in_bytes'] / GIB:9.3f} {p['peak_bytes'] / GIB:9.3f} "
                     f"{p['flops'] / 1e12:9.3f} {p['xla_flops'] / 1e12:9.3f} {p['xla_bytes'] / 1e9:8.2f} "
                     f"{p['xla_collective_bytes'] / 1e9:8.2f} "
                     f"{'-' if t is None else f'{t:10.4f}':>10}"
                     + (f"  bytes/step {p['bytes_over_floor']:.1f}x the floor" if "bytes_over_floor" in p else ""))
    lines.append("  compile seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["compile_seconds"].items()))
    if "forecast" in report:
        from fst_jax.forecast import format_forecast

        lines.append(format_forecast(report["forecast"]))
        lines.append(f"  (report and forecast as JSON: {report['json']})")
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


def _compiled(name: str, compile_fn):
    """``compile_fn()``; a compiler that runs out of device memory (the TPU compiler refuses a
    program whose temporaries exceed HBM) raises ``DryRunError`` naming ``name`` and its bytes."""
    try:
        return compile_fn()
    except Exception as e:  # XlaRuntimeError: its type differs across jaxlib versions
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise DryRunError(f"{name} does not fit: {str(e).splitlines()[0]}") from None


_COLLECTIVE = re.compile(r"= (\((?:[^()]|\([^()]*\))*\)|\S+) (?:all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(-start)?\(")


def _loop_text(hlo: str) -> str:
    """The instructions of HLO text's while loops (bodies and conditions: a scan, the decode's
    token loop) and of every computation they call, nested loops included."""
    comps, name = {}, None
    for line in hlo.splitlines():
        if line[:1] not in ("", " ") and line.endswith("{"):  # a computation's header
            name = line.removeprefix("ENTRY ").split()[0].lstrip("%")
            comps[name] = []
        elif name is not None:
            comps[name].append(line)
    callees = lambda lines: {n for refs in re.findall(r"(?:body|condition|to_apply|calls|computations)="
                                                      r"(\{[^}]*\}|%[\w.\-]+)", "\n".join(lines))
                             for n in re.findall(r"%([\w.\-]+)", refs)}
    todo = {n for lines in comps.values()
            for n in re.findall(r"(?:body|condition)=%([\w.\-]+)", "\n".join(lines))}
    inside: set[str] = set()
    while todo:
        n = todo.pop()
        if n not in inside and n in comps:
            inside.add(n)
            todo |= callees(comps[n])
    return "\n".join(line for n, lines in comps.items() if n in inside for line in lines)


def collective_sizes(hlo: str, in_loops: bool = False) -> list[int]:
    """Bytes of each array the collectives (all-gather, all-reduce, reduce-scatter, all-to-all,
    collective-permute) in compiled HLO text produce, each loop body counted once: every element
    of a combined (tuple) collective's result; of an async ``-start`` (a tuple of its operand,
    result and buffers), the largest: the result. ``in_loops``: only those inside while-loop
    bodies (run at every iteration: a layer, a micro-batch, a decoded token)."""
    if in_loops:
        hlo = _loop_text(hlo)
    sizes = []
    for result, start in _COLLECTIVE.findall(hlo):
        arrays = []
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result):
            bits = int(re.sub(r"\D", "", dtype) or 8)  # pred: a byte
            arrays.append(math.prod(int(d) for d in dims.split(",") if d) * max(1, bits // 8))
        sizes += [max(arrays)] if start else arrays
    return sizes


def collective_bytes(hlo: str) -> int:
    """The sum of ``collective_sizes``."""
    return sum(collective_sizes(hlo))


def _cost(compiled, flops: float, floor_bytes: float, chip) -> dict[str, float]:
    """Per device: ``flops`` (by formula, ``fst_jax.roofline``), XLA's ``xla_flops`` and
    ``xla_bytes`` (loop bodies counted once), ``xla_collective_bytes``, those inside loop bodies
    ``xla_loop_collective_bytes`` and the largest single collective's
    ``xla_largest_collective_bytes`` (``collective_sizes``), ``bytes`` (the larger of XLA's and
    ``floor_bytes``) and, for a TPU ``chip`` (``fst_jax.tpu.Slice``), ``roofline_seconds``."""
    ca = compiled.cost_analysis()
    ca = (ca[0] if isinstance(ca, (list, tuple)) else ca) or {}
    hlo = compiled.as_text()
    sizes = collective_sizes(hlo)
    out = {"flops": float(flops), "xla_flops": float(ca.get("flops", 0.0)),
           "xla_bytes": float(ca.get("bytes accessed", 0.0)),
           "xla_collective_bytes": float(sum(sizes)),
           "xla_loop_collective_bytes": float(sum(collective_sizes(hlo, in_loops=True))),
           "xla_largest_collective_bytes": float(max(sizes, default=0))}
    out["bytes"] = max(out["xla_bytes"], float(floor_bytes))
    if chip is not None:
        out["roofline_seconds"] = roofline_seconds(out["flops"], out["bytes"], chip.device_flops,
                                                   chip.device_bandwidth)
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
    from fst_jax.tpu import topology_devices

    devices = jax.devices() if spec.topology is None else topology_devices(spec.topology)
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
    programs["train_step"] = _compiled("train_step", lambda: jax.jit(step, donate_argnums=0)
                                       .lower(state, batch).compile())
    seconds["train_step"] = time.perf_counter() - t0
    parts = {"weights": _shard_bytes((state.params, state.frozen)),
             "reference": _shard_bytes(state.ref), "lora": _shard_bytes(state.lora),
             "optimizer": _shard_bytes(state.opt_state),
             "other_state": _shard_bytes((state.step, state.skipped, state.rng)),
             "batch": _shard_bytes(batch)}
    parts["sampler_weights"] = parts["weights"] if spec.sampler_copy else 0
    resident = sum(parts.values())
    n, m = spec.num_devices, spec.model
    chip = None if spec.topology is None else parse_topology(spec.topology)
    compiled = programs["train_step"]
    programs = {"train_step": _memory(compiled, resident, resident)}
    train_floor = programs["train_step"]["argument_size_in_bytes"] + programs["train_step"]["output_size_in_bytes"]
    programs["train_step"].update(_cost(compiled, train_step_flops(m, spec.learner.kl.beta, B, T) / n,
                                        train_floor, chip))
    if spec.generate:
        from flax import nnx

        from fst_jax.models.tokenizer import ByteChatTokenizer
        from fst_jax.sampling import Sampler

        cfg = spec.sampling
        if cfg.unroll_layers is None:  # the accelerator's choice, not this CPU's
            cfg = dataclasses.replace(cfg, unroll_layers=False)
        sampler = Sampler(nnx.eval_shape(lambda: init_model(spec.model)),
                          ByteChatTokenizer(cfg.max_context_tokens), cfg, mesh)
        # Full fine-tuning samples from the trained weights themselves; LoRA from a merged copy;
        # under FSDP both from a gathered copy (``Sampler.gathers``).
        weights = _shard_bytes(sampler.params)
        held = weights if parts["lora"] == 0 and not sampler.gathers else 0
        layer_weights = _shard_bytes([x for x in jax.tree.leaves(sampler.params)
                                      if x.ndim >= 2 and x.shape[0] == m.num_layers])
        for g in spec.generate:
            t0 = time.perf_counter()
            compiled = _compiled(f"{g.name}_prefill/decode", lambda g=g: sampler.compile_generate(
                g.contexts, g.prompts_per_context, g.samples, g.context_tokens, g.task_tokens,
                g.new_tokens))
            seconds[g.name] = time.perf_counter() - t0
            C, P = slot_shape(g.contexts, g.prompts_per_context, batch_devices(mesh))
            Lc, Lt = (bucket(t, cfg.prompt_buckets) for t in (g.context_tokens, g.task_tokens))
            rows, keys = C * P * g.samples, Lc + Lt + g.new_tokens
            pre = programs[f"{g.name}_prefill"] = _memory(compiled["prefill"], resident, held)
            pre.update(_cost(compiled["prefill"], prefill_flops(m, C, P, Lc, Lt) / n,
                             pre["argument_size_in_bytes"] + pre["output_size_in_bytes"], chip))
            dec = programs[f"{g.name}_decode"] = _memory(compiled["decode"], resident, held)
            # One decode step reads the weights and the whole KV cache once; XLA's bytes count
            # one step and, with the layers scanned, one layer of it.
            kv = kv_cache_bytes(m, C * Lc + C * P * Lt + rows * g.new_tokens) / n
            step_floor = weights + kv
            layers = 1 if cfg.unroll_layers else m.num_layers
            counted_floor = weights - layer_weights + (layer_weights + kv) / layers
            dec.update(_cost(compiled["decode"], g.new_tokens * decode_step_flops(m, rows, keys) / n,
                             g.new_tokens * step_floor, chip))
            dec["step_floor_bytes"] = step_floor
            dec["bytes_over_floor"] = dec["xla_bytes"] / counted_floor
            # The compiler's bytes per step, scaled to every layer and step.
            dec["bytes"] = g.new_tokens * step_floor * max(1.0, dec["bytes_over_floor"])
            if chip is not None:
                dec["roofline_seconds"] = roofline_seconds(dec["flops"], dec["bytes"],
                                                           chip.device_flops, chip.device_bandwidth)
    model = f"{m.family} model ({m.num_layers} layers, hidden {m.hidden_size})"
    return {"model": model, "bytes": parts, "programs": programs,
            "total_bytes": max(p["peak_bytes"] for p in programs.values()),
            "mesh": dict(mesh.shape), "num_devices": spec.num_devices,
            "num_params": int(sum(math.prod(x.shape) for x in
                                  jax.tree.leaves((abstract.params, abstract.frozen)))),
            "compile_seconds": {k: round(v, 2) for k, v in seconds.items()},
            "compiler": (f"CPU compiler over {n} fake devices (temporaries are estimates)"
                         if chip is None else f"TPU compiler (libtpu) for {chip.name}")}


if __name__ == "__main__":
    try:
        print(json.dumps(measure(load_config(DryRunSpec, sys.argv[1]))))
    except DryRunError as e:  # the compiler refused a program for its memory
        print(json.dumps({"refused": str(e)}))
