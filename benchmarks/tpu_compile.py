"""One GRPO train step compiled for a TPU slice by libtpu, fst_jax beside google-tunix 0.1.7.

What is compared: the program each side jits for one policy update on the same work, compiled
(compile-only, no TPU attached: ``fst_jax.tpu.topology_devices``) for the same slice with the
same libtpu, and reported per chip from the compiled executable:

- ours: ``make_train_step`` as the loop calls it (``fst_jax.dryrun.dry_run``, the ``--dry-run``
  machinery), GRPO loss, AdamW, FSDP over every chip (mesh data=1, fsdp=N);
- tunix: its ``Qwen3`` model (``tunix.models.qwen3``) and the actor update its ``GRPOLearner``
  jits: ``PeftTrainer._train_step`` (``nnx.value_and_grad`` of the registered ``grpo`` policy
  loss, ``optax.adamw``, ``nnx.Optimizer.update``) under ``nnx.jit(..., donate_argnames=
  ("optimizer",))``, wired as ``GRPOLearner.__init__`` wires it; FSDP over every chip (tunix's
  mesh ``(fsdp, tp) = (N, 1)``, its default sharding rules; the batch sharded on ``fsdp`` as
  its ``shard_input`` does). It runs in tunix's own venv (``benchmarks/setup_tunix_venv.sh``,
  plus ``pip install "jax[tpu]==<its jax>"`` for libtpu).

Same model on both sides: a Qwen3 shape (``--model``, ``--layers``), bfloat16 compute over
float32 weights, each decoder layer rematerialised (ours ``remat``, tunix
``RematConfig.DECODER``); ``--rows`` sequences of ``--prompt`` + ``--completion`` tokens. With
``--kl-beta 0`` (default) both programs do the same work: forward, backward with remat, AdamW.
With ``--kl-beta > 0`` ours also runs the reference forward inside the step, while tunix's
step reads reference log-probs computed by another program (not compiled here).

One JSON line per program: memory per chip (arguments, outputs, aliases, temporaries, peak =
arguments + outputs - aliases + temporaries, ``fst_jax.dryrun._memory``), XLA's cost analysis
per chip (``xla_flops``, ``xla_bytes``: a loop body counted once, so our scanned layers are
seen once; tunix unrolls its layers), the formula FLOPs per chip (``fst_jax.roofline``) and
compile seconds. Then one line of ratios.

    bash benchmarks/setup_tunix_venv.sh && .venv-tunix/bin/pip install "jax[tpu]==0.10.2"
    nice -n 10 python benchmarks/tpu_compile.py [--topology v5p:2x2x2] [--model qwen3-8b]
        [--layers 4] [--rows 8] [--prompt 256] [--completion 256] [--kl-beta 0]
        [--logits-chunk 256] [--out benchmarks/results_tpu_compile.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tunix venv imports fst_jax's helpers from the checkout

from fst_jax.dryrun import _cost, _memory  # noqa: E402
from fst_jax.models.configs import QWEN3_8B, ModelConfig  # noqa: E402
from fst_jax.roofline import train_step_flops  # noqa: E402
from fst_jax.tpu import parse_topology, runtime_env, topology_devices  # noqa: E402

TUNIX_PY = ROOT / ".venv-tunix" / "bin" / "python"
LR = 1e-6
MODELS = {
    "qwen3-8b": QWEN3_8B,
    # Qwen/Qwen3-0.6B config.json: tied embeddings, 28 layers of width 1024.
    "qwen3-0.6b": QWEN3_8B.replace(hidden_size=1024, intermediate_size=3072, num_layers=28,
                                   num_heads=16, num_kv_heads=8, tie_word_embeddings=True),
}
# Qwen3's <|endoftext|> (pad) and <|im_end|> (eos).
PAD_ID, EOS_ID = 151643, 151645


def _line(side: str, compiled, seconds: float, m: ModelConfig, args, flops_beta: float,
          chip) -> dict:
    """One program's JSON line (per chip); every argument counts as resident."""
    n = chip.devices
    T = args.prompt + args.completion
    mem = _memory(compiled, 0, 0)
    cost = _cost(compiled, train_step_flops(m, flops_beta, args.rows, T) / n,
                 mem["argument_size_in_bytes"] + mem["output_size_in_bytes"], chip)
    return {"side": side, "program": "train_step", **mem, **cost,
            "compile_seconds": round(seconds, 1)}


# -- ours (the project's env) --------------------------------------------------------------------
def run_ours(m: ModelConfig, args) -> dict:
    """Our train step through the dry run's own compile (``dry_run`` in its subprocess)."""
    from fst_jax.dryrun import dry_run
    from fst_jax.rl import LearnerConfig, OptimizerConfig
    from fst_jax.rl.kl import KLConfig
    from fst_jax.rl.losses import LossConfig
    from fst_jax.sharding import MeshConfig

    chip = parse_topology(args.topology)
    learner = LearnerConfig(loss=LossConfig(name="grpo"), kl=KLConfig(beta=args.kl_beta),
                            optimizer=OptimizerConfig(lr=LR, warmup_steps=1),
                            logits_chunk=args.logits_chunk)
    rep = dry_run(m, learner, MeshConfig(data=1, fsdp=chip.devices), chip.devices, args.rows,
                  args.prompt + args.completion, None, timeout_s=1800, topology=args.topology)
    p = rep["programs"]["train_step"]
    return {"side": "fst_jax", "program": "train_step", **p,
            "compile_seconds": rep["compile_seconds"]["train_step"], "state_bytes": rep["bytes"]}


# -- tunix (its own venv) ------------------------------------------------------------------------
def run_tunix(m: ModelConfig, args) -> dict:
    """tunix's GRPO actor update, compiled for the slice from abstract (never allocated) state."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from tunix.models.qwen3 import model as qwen3
    from tunix.rl import common, function_registry
    from tunix.rl.grpo import grpo_learner
    from tunix.sft import peft_trainer

    chip = parse_topology(args.topology)
    mesh = jax.sharding.Mesh(np.array(topology_devices(args.topology)).reshape(chip.devices, 1),
                             ("fsdp", "tp"))
    cfg = qwen3.ModelConfig(
        num_layers=m.num_layers, vocab_size=m.vocab_size, embed_dim=m.hidden_size,
        hidden_dim=m.intermediate_size, num_heads=m.num_heads, head_dim=m.head_dim,
        num_kv_heads=m.num_kv_heads, rope_theta=int(m.rope_theta), norm_eps=m.rms_norm_eps,
        use_tied_embedding=m.tie_word_embeddings, remat_config=qwen3.RematConfig.DECODER,
        dtype=jnp.bfloat16, param_dtype=jnp.float32)
    tx = optax.adamw(LR)

    def build():
        model = qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    with jax.set_mesh(mesh):
        model, optimizer = nnx.eval_shape(build)

    def place(tree):  # each abstract leaf gets the NamedSharding of its partition spec
        specs = nnx.get_partition_spec(nnx.state(tree))
        return nnx.update(tree, jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                              sharding=NamedSharding(mesh, s or P())),
            nnx.state(tree), specs))

    place(model)
    place(optimizer)
    algo = grpo_learner.GRPOConfig(num_generations=2, num_iterations=1, beta=args.kl_beta)
    algo.temperature = 1.0  # GRPOLearner copies the rollout temperature here
    loss = function_registry.get_policy_loss_fn(algo.policy_loss_fn)
    # The trainer object only carries the loss wiring; its __init__ (checkpointing, metrics,
    # optimizer init on real arrays) needs concrete weights, so it is not run.
    trainer = peft_trainer.PeftTrainer.__new__(peft_trainer.PeftTrainer)
    trainer._lora_enabled = False
    trainer.with_loss_fn(lambda model, train_example, algo_config: loss(
        model, train_example, algo_config=algo, pad_id=PAD_ID, eos_id=EOS_ID), has_aux=True)
    trainer.with_gen_model_input_fn(lambda x: {"train_example": x, "algo_config": algo})
    B, Tp, Tc = args.rows, args.prompt, args.completion
    rows = NamedSharding(mesh, P("fsdp"))
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rows)  # noqa: E731
    example = common.TrainExample(
        prompt_ids=sds((B, Tp), jnp.int32), prompt_mask=sds((B, Tp), jnp.int32),
        completion_ids=sds((B, Tc), jnp.int32), completion_mask=sds((B, Tc), jnp.int32),
        advantages=sds((B,), jnp.float32),
        ref_per_token_logps=sds((B, Tc), jnp.float32) if args.kl_beta > 0 else None,
        old_per_token_logps=None)
    t0 = time.perf_counter()
    step = nnx.jit(trainer.create_train_step_fn(), donate_argnames=("optimizer",))
    with jax.set_mesh(mesh):
        compiled = step.lower(model, optimizer, example).compile()
    # Its reference pass is a separate program: the formula counts only this one's passes.
    return _line("tunix 0.1.7", compiled, time.perf_counter() - t0, m, args, 0.0, chip)


# -- driver --------------------------------------------------------------------------------------
def _tunix_child(args) -> dict:
    """``run_tunix`` in tunix's venv with libtpu's compile-only environment."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
           **runtime_env(parse_topology(args.topology))}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(vars(args), f, default=str)
    try:
        res = subprocess.run([str(TUNIX_PY), __file__, "--side-spec", f.name], env=env,
                             capture_output=True, text=True, timeout=3600)
    finally:
        os.unlink(f.name)
    if res.returncode:
        return {"side": "tunix 0.1.7", "error": f"exit {res.returncode}: {res.stderr[-3000:]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _model(args) -> ModelConfig:
    return MODELS[args.model].replace(num_layers=args.layers or MODELS[args.model].num_layers)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="v5p:2x2x2")
    ap.add_argument("--model", default="qwen3-8b", choices=sorted(MODELS))
    ap.add_argument("--layers", type=int, default=4, help="0: the model's own")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--completion", type=int, default=256)
    ap.add_argument("--kl-beta", type=float, default=0.0)
    ap.add_argument("--logits-chunk", type=int, default=256, help="ours; 0: all at once")
    ap.add_argument("--sides", default="ours,tunix")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--side-spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side_spec:
        spec = argparse.Namespace(**json.loads(Path(args.side_spec).read_text()))
        print(json.dumps(run_tunix(_model(spec), spec)), flush=True)
        return
    m = _model(args)
    shape = {"topology": args.topology, "model": args.model, "layers": m.num_layers,
             "rows": args.rows, "prompt": args.prompt, "completion": args.completion,
             "kl_beta": args.kl_beta, "logits_chunk_ours": args.logits_chunk}
    lines = []
    for side in args.sides.split(","):
        if side == "tunix" and not TUNIX_PY.exists():
            sys.exit(f"no tunix venv at {TUNIX_PY.parent.parent}: run benchmarks/setup_tunix_venv.sh")
        got = run_ours(m, args) if side == "ours" else _tunix_child(args)
        lines.append({**shape, **got})
        print(json.dumps(lines[-1]), flush=True)
    if len(lines) == 2 and not any("error" in x for x in lines):
        keys = ("peak_bytes", "temp_size_in_bytes", "argument_size_in_bytes", "xla_flops",
                "xla_bytes", "flops")
        lines.append({**shape, "ratio_ours_over_tunix": {
            k: round(lines[0][k] / lines[1][k], 3) if lines[1][k] else None for k in keys}})
        print(json.dumps(lines[-1]), flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)


if __name__ == "__main__":
    main()
