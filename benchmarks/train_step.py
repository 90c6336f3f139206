"""Benchmark the RL train step on SmolLM2-135M shapes (random init) against a plain peer step.

Configurations: {fp32, bf16 compute} x {full fine-tuning, LoRA r=16}; batch 8 x 256 tokens
(128 prompt + 128 completion). Ours: ``fst_jax.rl`` CISPO + k3 KL (beta 0.001) + metrics.
Peer: a plain optax AdamW + nnx step on a REINFORCE log-prob loss (full fine-tuning; google-tunix
is not installed). Each (configuration, side) runs in its own process so peak RSS is its own.
Prints one JSON object per configuration. ``--quick``: fp32 full only, fewer steps.
MFU = model FLOPs (3x forward for full fine-tuning, 2x for LoRA) / time / matmul peak, the peak
measured in the same process (before and after the steps, averaged) with a 2048^3 ``jnp.dot`` in
the compute dtype. On a shared machine the two processes see different loads:
``ratio_peak_normalized`` scales the time ratio by the ratio of the peaks each process measured.
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

CONFIGS = {"fp32_full": ("float32", 0), "bf16_full": ("bfloat16", 0),
           "fp32_lora": ("float32", 16), "bf16_lora": ("bfloat16", 16)}
B, P, C = 8, 128, 128
PEER = "plain optax.adamw + nnx log-prob (REINFORCE) step, full fine-tuning"


def _timed(fn, steps):
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(dtype) -> float:
    import jax
    import jax.numpy as jnp
    n = 2048
    a = jnp.ones((n, n), dtype)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    return 2 * n ** 3 / _timed(lambda: dot(a, a).block_until_ready(), 5)


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


def run_ours(mc, rank, steps):
    from fst_jax.models.transformer import init_model
    from fst_jax.rl import LearnerConfig, LoraConfig, OptimizerConfig
    from fst_jax.rl.batch import shard_batch
    from fst_jax.rl.train_step import init_train_state, make_ref_logprobs, make_train_step
    from fst_jax.sharding import make_mesh
    mesh = make_mesh()
    cfg = LearnerConfig(optimizer=OptimizerConfig(lr=1e-6), lora=LoraConfig(rank=rank, alpha=32.0))
    g, state = init_train_state(init_model(mc), cfg, mesh)
    step = make_train_step(g, state, cfg, mesh)
    ref_fn = make_ref_logprobs(g, state, cfg, mesh)
    batch = shard_batch(_batch(mc), mesh)
    t = time.perf_counter()
    batch = batch.replace(ref_logp=ref_fn(state, batch).block_until_ready())
    extra = {"ref_logprobs_first_call_s": round(time.perf_counter() - t, 2)}
    t = time.perf_counter()
    state, m = step(state, batch)
    m["loss"].block_until_ready()
    extra["compile_and_first_step_s"] = round(time.perf_counter() - t, 2)
    holder = [state]

    def one():
        holder[0], metrics = step(holder[0], batch)
        metrics["loss"].block_until_ready()

    return _timed(one, steps), extra


def run_peer(mc, steps):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from fst_jax.models.transformer import init_model
    graphdef, params = nnx.split(init_model(mc))
    opt = optax.adamw(1e-6)
    opt_state = opt.init(params)
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
    holder = [params, opt_state]

    def one():
        holder[0], holder[1], loss = step(holder[0], holder[1], *args)
        loss.block_until_ready()

    one()  # compile
    return _timed(one, steps), {}


def child(name, side, steps):
    import jax.numpy as jnp
    from fst_jax.models.configs import SMOLLM2_135M
    dtype, rank = CONFIGS[name]
    mc = SMOLLM2_135M.replace(dtype=dtype)
    peak_before = matmul_peak(jnp.dtype(dtype))
    seconds, extra = run_ours(mc, rank, steps) if side == "ours" else run_peer(mc, steps)
    peak = (peak_before + matmul_peak(jnp.dtype(dtype))) / 2  # the machine's load drifts
    flops = model_flops(mc, lora=side == "ours" and rank > 0)
    print(json.dumps({"s_per_step": seconds, "mfu": flops / seconds / peak,
                      "matmul_peak_gflops": peak / 1e9,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                      **extra}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fp32 full fine-tuning only, 2 steps")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "SIDE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    steps = 2 if args.quick else args.steps
    if args.child:
        return child(*args.child, steps)
    names = ["fp32_full"] if args.quick else list(CONFIGS)
    for name in names:
        res = {}
        for side in ("ours", "peer"):
            out = subprocess.run([sys.executable, __file__, "--child", name, side, "--steps",
                                  str(steps)], capture_output=True, text=True, check=True,
                                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
            res[side] = json.loads(out.stdout.strip().splitlines()[-1])
        ours, peer = res["ours"], res["peer"]
        print(json.dumps({
            "config": name, "ours_s_per_step": round(ours["s_per_step"], 3), "peer": PEER,
            "peer_s_per_step": round(peer["s_per_step"], 3),
            "ratio": round(ours["s_per_step"] / peer["s_per_step"], 3),
            "ratio_peak_normalized": round(ours["s_per_step"] * ours["matmul_peak_gflops"]
                                           / (peer["s_per_step"] * peer["matmul_peak_gflops"]), 3),
            "mfu": round(ours["mfu"], 4), "peer_mfu": round(peer["mfu"], 4),
            "tokens_per_s": round(B * (P + C) / ours["s_per_step"], 1),
            "peak_rss_gb": round(ours["peak_rss_gb"], 2),
            "peer_peak_rss_gb": round(peer["peak_rss_gb"], 2),
            "matmul_peak_gflops": round(ours["matmul_peak_gflops"], 1),
            "peer_matmul_peak_gflops": round(peer["matmul_peak_gflops"], 1),
            **{k: v for k, v in ours.items() if k.endswith("_s")}}), flush=True)


if __name__ == "__main__":
    main()
