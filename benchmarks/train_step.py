"""Benchmark the RL train step on SmolLM2-135M shapes (random init) against a plain peer step.

Configurations: {fp32, bf16 compute} x {full fine-tuning, LoRA r=16}; batch 8 x 256 tokens
(128 prompt + 128 completion); ``--configs`` also offers ``*_remat`` variants (each layer
recomputed in the backward pass). Ours: ``fst_jax.rl`` CISPO + k3 KL (beta 0.001) + all metrics
(reference log-probs precomputed, timed apart), log-probs in chunks of ``LOGITS_CHUNK`` tokens.
Peer: a plain optax AdamW + nnx step on a REINFORCE log-prob loss, full fine-tuning, no remat
(google-tunix is not installed).

Each configuration runs in its own process: ours is built and compiled first, so the peak RSS
after its warm-up step is its own; then the peer is built and the two steps alternate, so both
see the same machine load (the machine is shared) and the ratio of their medians is fair.
MFU = model FLOPs (3x forward for full fine-tuning, 2x for LoRA; remat's recompute not counted)
/ median step time / matmul peak, the peak measured in the same process with a 2048^3
``jnp.dot`` in the compute dtype.
Prints one JSON object per configuration. ``--quick``: fp32 full only, 2 rounds.

``--shared-prefix``: the learner's dense path against its shared-prefix path
(``LearnerConfig.shared_prefix``) at FST's shape: 4 contexts of 300 tokens x 8 problems of 45
tokens, 8 samples per problem (2 per context: 32 prompts x 2 rows, prompt bucket 512), 128 new
tokens (every completion full), SmolLM2-135M size, fp32, layers rematerialised (without, the
dense update needs ~67 GB), full fine-tuning, CISPO + k3 KL,
micro_batches 2, logits in 128-token chunks. Each path runs in its own process (its peak RSS its
own): a warm-up step, then ``--rounds`` steps; the update (``train_step`` less its reference pass)
and the reference pass in medians. One JSON line per path, then one with the ratios
(shared / dense). ``--problems n``: n problems instead of 8 (4n prompts x 2 rows; 8 took ~13 min
a dense step on two cores). ``--tiny``: the same layout on ``configs.tiny()`` (checks the script only).

    python benchmarks/train_step.py --shared-prefix --problems 2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {"fp32_full": ("float32", 0, False), "bf16_full": ("bfloat16", 0, False),
           "fp32_lora": ("float32", 16, False), "bf16_lora": ("bfloat16", 16, False),
           "fp32_full_remat": ("float32", 0, True), "fp32_lora_remat": ("float32", 16, True)}
DEFAULT_CONFIGS = ["fp32_full", "bf16_full", "fp32_lora", "bf16_lora"]
B, P, C = 8, 128, 128
LOGITS_CHUNK = 64
PEER = "plain optax.adamw + nnx log-prob (REINFORCE) step, full fine-tuning"


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def matmul_peak(dtype) -> float:
    import jax
    import jax.numpy as jnp
    n = 2048
    a = jnp.ones((n, n), dtype)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    return 2 * n ** 3 / statistics.median(_seconds(lambda: dot(a, a).block_until_ready())
                                          for _ in range(5))


def model_flops(mc, lora: bool) -> float:
    T = P + C
    D, H, K, hd, F, L, V = (mc.hidden_size, mc.num_heads, mc.num_kv_heads, mc.head_dim,
                            mc.intermediate_size, mc.num_layers, mc.vocab_size)
    per_token = L * (2 * (2 * D * H * hd + 2 * D * K * hd + 3 * D * F) + 4 * H * hd * T)
    forward = B * T * per_token + 2 * B * (T - 1) * D * V
    return forward * (2 if lora else 3)


def _batch(mc):
    import numpy as np
    from fst_jax.rl.batch import build_train_batch
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, mc.vocab_size, P) for _ in range(B)]
    comps = [rng.integers(1, mc.vocab_size, C) for _ in range(B)]
    return build_train_batch(prompts, comps, [-rng.random(C) for _ in range(B)],
                             [float(i % 2) for i in range(B)], [i // 4 for i in range(B)],
                             [0] * B, pad_id=0)


def build_ours(mc, rank):
    """Our learner's step as a no-argument callable, plus setup timings."""
    from fst_jax.models.transformer import init_model
    from fst_jax.rl import LearnerConfig, LoraConfig, OptimizerConfig
    from fst_jax.rl.batch import shard_batch
    from fst_jax.rl.train_step import init_train_state, make_ref_logprobs, make_train_step
    from fst_jax.sharding import make_mesh
    mesh = make_mesh()
    cfg = LearnerConfig(optimizer=OptimizerConfig(lr=1e-6), lora=LoraConfig(rank=rank, alpha=32.0),
                        logits_chunk=LOGITS_CHUNK)
    g, state = init_train_state(init_model(mc), cfg, mesh)
    step = make_train_step(g, state, cfg, mesh)
    ref_fn = make_ref_logprobs(g, state, cfg, mesh)
    batch = shard_batch(_batch(mc), mesh)
    holder = {"state": state, "batch": batch}

    def ref():
        holder["batch"] = batch.replace(ref_logp=ref_fn(holder["state"], batch).block_until_ready())

    def one():
        holder["state"], metrics = step(holder["state"], holder["batch"])
        metrics["loss"].block_until_ready()

    timings = {"ref_logprobs_compile_s": _seconds(ref), "ref_logprobs_s": _seconds(ref),
               "compile_and_first_step_s": _seconds(one)}
    return one, timings


def build_peer(mc):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from fst_jax.models.transformer import init_model
    graphdef, params = nnx.split(init_model(mc))
    opt = optax.adamw(1e-6)
    b = _batch(mc)

    def step(params, opt_state, tokens, positions, mask, loss_mask, adv):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(tokens, positions, mask)[:, :-1]
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
            lm = loss_mask[:, 1:]
            return -jnp.sum(adv[:, None] * logp * lm) / lm.sum()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    args = (b.tokens, b.positions, b.mask, b.loss_mask, b.advantages)
    holder = [params, opt.init(params)]

    def one():
        holder[0], holder[1], loss = step(holder[0], holder[1], *args)
        loss.block_until_ready()

    one()  # compile
    return one


def child(name, rounds):
    import jax.numpy as jnp
    from fst_jax.models.configs import SMOLLM2_135M
    dtype, rank, remat = CONFIGS[name]
    mc = SMOLLM2_135M.replace(dtype=dtype)
    ours, timings = build_ours(mc.replace(remat=remat), rank)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ours alone, GB
    peer = build_peer(mc)
    t_ours, t_peer = [], []
    for _ in range(rounds):
        t_ours.append(_seconds(ours))
        t_peer.append(_seconds(peer))
    s_ours, s_peer = statistics.median(t_ours), statistics.median(t_peer)
    peak = matmul_peak(jnp.dtype(dtype))
    print(json.dumps({
        "config": name, "logits_chunk": LOGITS_CHUNK, "remat": remat,
        "ours_s_per_step": round(s_ours, 3), "peer": PEER,
        "peer_s_per_step": round(s_peer, 3), "ratio": round(s_ours / s_peer, 3),
        "mfu": round(model_flops(mc, lora=rank > 0) / s_ours / peak, 4),
        "peer_mfu": round(model_flops(mc, lora=False) / s_peer / peak, 4),
        "tokens_per_s": round(B * (P + C) / s_ours, 1), "peak_rss_gb": round(rss, 2),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "steps_ours_s": [round(t, 2) for t in t_ours], "steps_peer_s": [round(t, 2) for t in t_peer],
        **{k: round(v, 2) for k, v in timings.items()}}), flush=True)


def fst_batch(vocab: int, contexts=4, problems=8, samples=8, context_len=300, problem_len=45,
              prompt_bucket=512, new=128):
    """A host TrainBatch laid out as a rollout lays FST's out (problem-major, ``samples //
    contexts`` consecutive rows per (context, problem) prompt), random tokens."""
    import numpy as np
    from fst_jax.rl.batch import build_train_batch
    rng = np.random.default_rng(0)
    ctx = [rng.integers(1, vocab, context_len) for _ in range(contexts)]
    prompts = [np.concatenate([ctx[k], rng.integers(1, vocab, problem_len + p % 3)])
               for p in range(problems) for k in range(contexts)]
    n = samples // contexts
    rows = len(prompts) * n
    comps = [rng.integers(1, vocab, new) for _ in range(rows)]
    return build_train_batch([prompts[r // n] for r in range(rows)], comps,
                             [-rng.random(new) for _ in range(rows)],
                             [float(rng.random() < 0.5) for _ in range(rows)],
                             [r // samples for r in range(rows)],
                             [(r // n) % contexts for r in range(rows)], pad_id=0,
                             prompt_buckets=(prompt_bucket,), completion_buckets=(new,))


def prefix_child(path: str, rounds: int, tiny: bool, problems: int):
    from fst_jax.models import configs
    from fst_jax.models.configs import SMOLLM2_135M
    from fst_jax.models.transformer import init_model
    from fst_jax.rl import LearnerConfig, OptimizerConfig
    from fst_jax.rl.batch import shard_batch
    from fst_jax.rl.kl import KLConfig
    from fst_jax.rl.train_step import init_train_state, make_train_step
    from fst_jax.sharding import make_mesh
    mc = (configs.tiny() if tiny else SMOLLM2_135M.replace(dtype="float32")).replace(remat=True)
    cfg = LearnerConfig(optimizer=OptimizerConfig(lr=1e-6), kl=KLConfig(beta=0.001),
                        micro_batches=2, logits_chunk=128, shared_prefix=path == "shared")
    mesh = make_mesh()
    g, state = init_train_state(init_model(mc), cfg, mesh)
    step = make_train_step(g, state, cfg, mesh)
    batch = shard_batch(fst_batch(mc.vocab_size, problems=problems), mesh)
    update, reference = [], []
    for i in range(rounds + 1):  # the first: compile
        timings = {}
        t0 = time.perf_counter()
        state, metrics = step(state, batch, timings=timings)
        metrics["loss"].block_until_ready()
        total = time.perf_counter() - t0
        update.append(total - timings["reference"])
        reference.append(timings["reference"])
    B, T = batch.tokens.shape
    print(json.dumps({
        "path": path, "model": "tiny" if tiny else "SmolLM2-135M", "rows": B, "seq_len": T,
        "update_s": round(statistics.median(update[1:]), 3),
        "reference_s": round(statistics.median(reference[1:]), 3),
        "first_update_s": round(update[0], 2), "first_reference_s": round(reference[0], 2),
        "updates_s": [round(t, 2) for t in update[1:]],
        "references_s": [round(t, 2) for t in reference[1:]],
        "loss": float(metrics["loss"]), "kl": float(metrics["kl"]),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}),
        flush=True)


def compare_prefix(rounds: int, tiny: bool, problems: int):
    out = {}
    for path in ("dense", "shared"):
        cmd = [sys.executable, __file__, "--prefix-child", path, "--rounds", str(rounds),
               "--problems", str(problems)]
        run = subprocess.run(cmd + (["--tiny"] if tiny else []), capture_output=True, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if run.returncode:
            sys.exit(f"{path} failed:\n{run.stderr[-3000:]}")
        line = run.stdout.strip().splitlines()[-1]
        out[path] = json.loads(line)
        print(line, flush=True)
    d, s = out["dense"], out["shared"]
    print(json.dumps({"compare": "shared_prefix / dense", "rounds": rounds,
                      **{k: round(s[k] / d[k], 3) for k in ("update_s", "reference_s", "peak_rss_gb")},
                      "loss_diff": abs(s["loss"] - d["loss"]), "kl_diff": abs(s["kl"] - d["kl"])}),
          flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fp32 full fine-tuning only, 2 rounds")
    ap.add_argument("--rounds", type=int, default=3, help="timed steps of each side")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT_CONFIGS)
    ap.add_argument("--shared-prefix", action="store_true",
                    help="dense vs shared-prefix learner at FST's shape (see the docstring)")
    ap.add_argument("--tiny", action="store_true", help="with --shared-prefix: a tiny model")
    ap.add_argument("--problems", type=int, default=8,
                    help="with --shared-prefix: problems per step (8 x 8 rows: ~13 min a dense step here)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--prefix-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    rounds = 2 if args.quick else args.rounds
    if args.prefix_child:
        return prefix_child(args.prefix_child, rounds, args.tiny, args.problems)
    if args.child:
        return child(args.child, rounds)
    if args.shared_prefix:
        return compare_prefix(rounds, args.tiny, args.problems)
    for name in ["fp32_full"] if args.quick else args.configs:
        out = subprocess.run([sys.executable, __file__, "--child", name, "--rounds", str(rounds)],
                             capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if out.returncode:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
