"""A full RL step, fst_jax vs google-tunix 0.1.7's ``GRPOLearner``, on identical work, same run.

Model: SmolLM2-135M-Instruct (bundled), float32, full fine-tuning, AdamW (lr 1e-6), KL beta 0.04
(k3 on our side; tunix's ``kl`` mode is the same estimator), temperature 1, EOS never stops a row
(ours: ``SamplingConfig(stop_at_eos=False)``; tunix: an EOS id outside the vocabulary), so both
sides sample exactly the same number of tokens from exactly the same prompt tokens.

Configurations:
- ``rl``: 2 prompts x 4 samples, 64-token prompt bucket, 192 sampled tokens; the full step:
  rollout (ours: ``Sampler.generate``; tunix: ``RLCluster.generate`` inside ``GRPOLearner``),
  reference log-probs (ours: inside ``train_step``, timed apart; tunix: ``get_ref_per_token_logps``) and the
  update (ours: ``make_train_step``, GRPO loss; tunix: ``update_actor``, its GRPO loss).
- ``fst``: FST's shape, rollout only: 4 contexts of about 300 tokens x 8 problems, 8 samples per
  problem (2 per context) = 32 (context, problem) prompts x 2 samples, 128 new tokens. Tunix
  gets the same 32 prompt texts, each repeated twice, through the learner's rollout path.

Each side runs in its own process (tunix in its own venv: ``benchmarks/setup_tunix_venv.sh``),
one process per configuration and side, one after the other, so its peak RSS is its own: a warm-up step (compile) then ``--steps``
measured steps; seconds are medians. Each process also measures a float32 matmul peak
(2048^3 dot) and a memory-copy bandwidth (read + write of a 256 MB array) with the same jax, and
reports utilisation against them: update and reference = model FLOPs / time / peak; rollout =
bytes a decode step must read (weights + keys/values attended) / decode-step time / bandwidth
("bandwidth_util"; 1.0 = at the bandwidth bound). Tunix tokenises the prompt texts itself; both
sides report the prompt token counts they saw, and the script fails if they differ.

    bash benchmarks/setup_tunix_venv.sh            # once
    nice -n 10 python benchmarks/rl_step.py [--configs rl,fst] [--steps 2] [--sides ours,tunix]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUNIX_PY = ROOT / ".venv-tunix" / "bin" / "python"
LR, BETA = 1e-6, 0.04
RULES = ("Solve the arithmetic word problem step by step. Read the question twice, identify "
         "the quantities and the operation, compute carefully, check the result by estimating, "
         "and write the final answer as a plain number on its own line after '####'. ")


# -- shared by both sides (plain jax only) -----------------------------------------------------
def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def machine_peaks() -> dict:
    """float32 matmul FLOP/s and copy bandwidth (bytes read + written per second), medians."""
    import jax
    import jax.numpy as jnp
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    flops = 2 * n ** 3 / statistics.median(_seconds(lambda: dot(a, a).block_until_ready())
                                           for _ in range(5))
    x = jnp.ones((64 << 20,), jnp.float32)  # 256 MB
    scale = jax.jit(lambda v: v * 1.0001)
    scale(x).block_until_ready()
    bw = 2 * x.nbytes / statistics.median(_seconds(lambda: scale(x).block_until_ready())
                                          for _ in range(5))
    return {"matmul_peak_gflops": round(flops / 1e9, 1), "copy_bandwidth_gbs": round(bw / 1e9, 2)}


def model_numbers(c: dict) -> dict:
    """Parameter count and per-token FLOP pieces from an HF config dict."""
    D, F, L, H = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"]
    K = c["num_key_value_heads"]
    hd = D // H
    V = c["vocab_size"]
    layer = D * H * hd + 2 * D * K * hd + H * hd * D + 3 * D * F
    return {"matmul_params": L * layer + D * V, "params": L * (layer + 2 * D) + D * V + D,
            "L": L, "H": H, "K": K, "hd": hd, "V": V, "D": D}


def forward_flops(m: dict, rows: int, T: int) -> float:
    """Forward FLOPs of ``rows`` causal sequences of ``T`` tokens (logits at every position)."""
    per_token = 2 * m["matmul_params"] + 2 * m["L"] * m["H"] * m["hd"] * T  # attn: avg T/2 keys
    return rows * T * per_token


def decode_bytes(m: dict, rows: int, kv_tokens_read: float) -> float:
    """Bytes one float32 decode step must read: the weights once, plus keys/values."""
    return 4 * (m["params"] + 2 * m["L"] * m["K"] * m["hd"] * kv_tokens_read)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _median(xs):
    return round(statistics.median(xs), 3)


# -- the work (built in the project's env, handed to both sides as JSON) -----------------------
def build_spec(configs: list[str], steps: int) -> dict:
    from fst_jax.models.bundled import prepare_smollm2
    from fst_jax.models.tokenizer import ChatTokenizer

    folder = prepare_smollm2()
    tok = ChatTokenizer(folder, max_context_tokens=512)
    spec = {"folder": str(folder), "steps": steps, "configs": {}}

    def add(name, pairs, n, new_tokens, full_step, bucket):
        texts, ids, ctx_lens = [], [], []
        for context, task in pairs:
            c, t = tok.encode(context, task)
            text = tok._render([{"role": "system", "content": context},
                                {"role": "user", "content": task}], True)
            if tok._ids(text) != list(c + t):
                raise SystemExit("chat text does not re-tokenise to the prompt ids")
            texts.append(text)
            ids.append(list(c + t))
            ctx_lens.append(len(c))
        spec["configs"][name] = {"texts": texts, "ids": ids, "context_lengths": ctx_lens, "n": n,
                                 "new_tokens": new_tokens, "full_step": full_step,
                                 "prompt_bucket": bucket}

    def add_rl():
        short = "You are a careful math tutor. Answer with a single number after ####."
        pairs = [(short, "A farmer has 12 cows and buys 7 more. Then he sells 3 of them at the "
                         "market. How many cows does he have now?"),
                 (short, "Tom reads 9 pages a day for 6 days, then 4 more pages on the last day. "
                         "How many pages did he read in all?")]  # 61 and 60 tokens
        add("rl", pairs, 4, 192, True, 64)

    def add_fst():
        ctxs = []
        for k in range(4):
            text = f"Strategy {k}. "
            while tok.count_context_tokens(text) < 290:
                text += RULES
            ctxs.append(text)
        tasks = [f"Problem {p}: A shop sells {12 + p} boxes of pencils on Monday and {30 + 2 * p} "
                 f"boxes on Tuesday. Each box holds {6 + p % 5} pencils. How many pencils did the "
                 "shop sell in total over the two days?" for p in range(8)]
        # problem-major, as a rollout lays out a group: problem p's prompts are rows 4p..4p+3.
        add("fst", [(ctxs[k], tasks[p]) for p in range(8) for k in range(4)], 2, 128, False, 512)

    for name in configs:
        {"rl": add_rl, "fst": add_fst}[name]()
    return spec


# -- ours --------------------------------------------------------------------------------------
def run_ours(spec: dict) -> dict:
    import jax
    import numpy as np

    from fst_jax.models.tokenizer import ChatTokenizer
    from fst_jax.models.weights import load_hf_folder
    from fst_jax.rl import LearnerConfig, OptimizerConfig
    from fst_jax.rl.batch import build_train_batch, shard_batch
    from fst_jax.rl.kl import KLConfig
    from fst_jax.rl.losses import LossConfig
    from fst_jax.rl.train_step import init_train_state, make_train_step
    from fst_jax.sampling import PromptBatch, Sampler, SamplingConfig
    from fst_jax.sharding import make_mesh

    folder = spec["folder"]
    hf_cfg = json.loads((Path(folder) / "config.json").read_text())
    m = model_numbers(hf_cfg)
    out = {"side": "fst_jax", **machine_peaks()}
    tok = ChatTokenizer(folder, max_context_tokens=512)
    for name, c in spec["configs"].items():
        _, model = load_hf_folder(folder)
        n, new = c["n"], c["new_tokens"]
        sampler = Sampler(model, tok, SamplingConfig(
            max_new_tokens=new, temperature=1.0, stop_at_eos=False,
            prompt_buckets=(64, 128, 256, 320, 512)))
        ids = c["ids"]
        Lp = c["prompt_bucket"]
        tokens = np.full((len(ids), Lp), tok.pad_id, np.int32)
        mask = np.zeros((len(ids), Lp), bool)
        for i, r in enumerate(ids):
            tokens[i, Lp - len(r):] = r
            mask[i, Lp - len(r):] = True
        prompts = PromptBatch(tokens, mask, np.asarray(c["context_lengths"], np.int32),
                              mask.sum(1).astype(np.int32))
        rec = {"prompt_tokens": [len(r) for r in ids]}
        if not c["full_step"]:
            params = sampler.params
            times = []
            for s in range(spec["steps"] + 1):
                times.append(_seconds(lambda: sampler.generate(params, prompts, n=n, seed=s)))
            rows = len(ids) * n
            rec.update(rollout_s=_median(times[1:]), compile_s=round(times[0] - min(times[1:]), 2),
                       rows=rows, sampled_tokens=rows * new,
                       rollout_tok_s=round(rows * new / statistics.median(times[1:]), 1))
            out[name] = rec
            continue
        mesh = make_mesh()
        cfg = LearnerConfig(loss=LossConfig(name="grpo"), kl=KLConfig(estimator="k3", beta=BETA),
                            optimizer=OptimizerConfig(lr=LR, warmup_steps=1),
                            logits_chunk=spec.get("logits_chunk", 64))
        g, state = init_train_state(model, cfg, mesh)
        train_step = make_train_step(g, state, cfg, mesh)
        holder = {"state": state}
        prompt_rows = [list(r) for r in ids]

        def one_step(seed):
            t0 = time.perf_counter()
            s = sampler.generate(holder["state"].weights(), prompts, n=n, seed=seed)
            t1 = time.perf_counter()
            comps = [s.tokens[r, :s.lengths[r]] for r in range(s.tokens.shape[0])]
            rewards = [float(np.mean(cp % 2)) for cp in comps]  # arbitrary, with variance
            batch = build_train_batch([prompt_rows[p] for p in s.prompt_index], comps,
                                      [s.logprobs[r, :s.lengths[r]] for r in range(len(comps))],
                                      rewards, list(s.prompt_index), [0] * len(comps),
                                      pad_id=tok.pad_id, advantage=cfg.advantage,
                                      prompt_buckets=(Lp,), completion_buckets=(new,))
            batch = shard_batch(batch, mesh)
            t2 = time.perf_counter()
            timings: dict = {}  # train_step computes the reference log-probs itself (beta > 0)
            holder["state"], metrics = train_step(holder["state"], batch, timings=timings)
            jax.block_until_ready(metrics)
            t4 = time.perf_counter()
            t3 = t2 + timings["reference"]
            return {"rollout": t1 - t0, "host": t2 - t1, "reference": t3 - t2, "update": t4 - t3,
                    "step": t4 - t0, "T": batch.shape[1], "rows": batch.shape[0],
                    "logp_diff_max": float(metrics["logp_diff_max"])}

        warm = one_step(0)
        runs = [one_step(s + 1) for s in range(spec["steps"])]
        med = {k: statistics.median(r[k] for r in runs) for k in ("rollout", "host", "reference",
                                                                  "update", "step")}
        rows, T = warm["rows"], warm["T"]
        fwd = forward_flops(m, rows, T)
        rec.update({f"{k}_s": round(v, 3) for k, v in med.items()})
        rec.update(compile_s=round(warm["step"] - med["step"], 2), rows=rows, seq_len=T,
                   steps_s=[round(r["step"], 2) for r in runs],
                   update_flops_util=round(3 * fwd / med["update"] / (out["matmul_peak_gflops"] * 1e9), 3),
                   reference_flops_util=round(fwd / med["reference"] / (out["matmul_peak_gflops"] * 1e9), 3),
                   sampler_vs_trainer_logp_diff_max=round(runs[-1]["logp_diff_max"], 5))
        out[name] = rec
    out["peak_rss_gb"] = round(peak_rss_gb(), 2)
    return out


# -- tunix -------------------------------------------------------------------------------------
def run_tunix(spec: dict) -> dict:
    import functools

    import jax
    import numpy as np
    import optax
    from flax import nnx
    from transformers import AutoTokenizer
    from tunix.models.llama3 import model as llama
    from tunix.models.llama3 import params as llama_params
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    folder = spec["folder"]
    hf_cfg = json.loads((Path(folder) / "config.json").read_text())
    m = model_numbers(hf_cfg)
    out = {"side": "tunix 0.1.7 GRPOLearner", **machine_peaks()}
    # tunix's llama calls apply_rope without rope_theta (always 1e6): SmolLM2 needs its own.
    llama.apply_rope = functools.partial(llama.apply_rope, rope_theta=hf_cfg["rope_theta"])
    mcfg = llama.ModelConfig(num_layers=m["L"], vocab_size=m["V"], embed_dim=m["D"],
                             hidden_dim=hf_cfg["intermediate_size"], num_heads=m["H"],
                             head_dim=m["hd"], num_kv_heads=m["K"], rope_theta=hf_cfg["rope_theta"],
                             norm_eps=hf_cfg["rms_norm_eps"],
                             weight_tying=hf_cfg.get("tie_word_embeddings", True))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    load = lambda: llama_params.create_model_from_safe_tensors(folder, mcfg, mesh,  # noqa: E731
                                                               dtype=np.float32)
    hf_tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    hf_tok.pad_token = "<|endoftext|>"
    for name, c in spec["configs"].items():
        actor, ref = load(), load()
        n, new = c["n"], c["new_tokens"]
        steps = spec["steps"]
        rollout_cfg = base_rollout.RolloutConfig(
            max_tokens_to_generate=new, max_prompt_length=c["prompt_bucket"],
            kv_cache_size=c["prompt_bucket"] + new + 8, temperature=1.0, top_p=1.0,
            eos_tokens=[m["V"]])  # never sampled: every row generates all `new` tokens
        cluster = rl_cluster_lib.RLCluster(
            actor=actor, reference=ref, tokenizer=hf_tok,
            cluster_config=rl_cluster_lib.ClusterConfig(
                role_to_mesh={r: mesh for r in (rl_cluster_lib.Role.ACTOR,
                                                rl_cluster_lib.Role.REFERENCE,
                                                rl_cluster_lib.Role.ROLLOUT)},
                rollout_engine="vanilla", offload_to_cpu=False,
                training_config=rl_cluster_lib.RLTrainingConfig(
                    actor_optimizer=optax.adamw(LR), eval_every_n_steps=10 ** 6,
                    max_steps=steps + 1),
                rollout_config=rollout_cfg))
        tok = cluster.rollout._sampler.tokenizer if hasattr(cluster.rollout, "_sampler") else None
        seen = [len(tok.tokenize(t)) for t in c["texts"]] if tok is not None else None
        rec = {"prompt_tokens": seen}
        if not c["full_step"]:
            texts = [t for t in c["texts"] for _ in range(n)]
            times = []
            for _ in range(steps + 1):
                t = time.perf_counter()
                res = cluster.generate(prompts=texts, mode=rl_cluster_lib.Mode.TRAIN,
                                       micro_batch_size=len(texts))
                times.append(time.perf_counter() - t)
            lens = [len(x) for x in res.tokens]
            rows = len(texts)
            rec.update(rollout_s=_median(times[1:]), compile_s=round(times[0] - min(times[1:]), 2),
                       rows=rows, sampled_tokens=int(sum(lens)),
                       rollout_tok_s=round(sum(lens) / statistics.median(times[1:]), 1))
            out[name] = rec
            cluster.close()
            continue
        phases: list[dict] = []

        def timed(key, fn, sync):
            def wrapper(*a, **kw):
                t = time.perf_counter()
                res = fn(*a, **kw)
                jax.block_until_ready(sync(res))
                phases[-1][key] = phases[-1].get(key, 0.0) + time.perf_counter() - t
                return res
            return wrapper

        def rollout_sync(res):
            return [jax.numpy.asarray(0)]

        orig_generate = cluster.generate

        def generate(*a, **kw):
            phases.append({"start": time.perf_counter()})
            return timed("rollout", orig_generate, rollout_sync)(*a, **kw)

        cluster.generate = generate
        cluster.get_ref_per_token_logps = timed("reference", cluster.get_ref_per_token_logps,
                                                lambda r: r)
        orig_update = cluster.update_actor

        def update(*a, **kw):
            res = timed("update", orig_update, lambda r: nnx.state(actor))(*a, **kw)
            phases[-1]["step"] = time.perf_counter() - phases[-1]["start"]
            return res

        cluster.update_actor = update
        learner = grpo_learner.GRPOLearner(
            rl_cluster=cluster, reward_fns=lambda prompts, completions, **kw: [
                float(len(x) % 7) / 7 for x in completions],
            algo_config=grpo_learner.GRPOConfig(num_generations=n, num_iterations=1, beta=BETA))
        data = [{"prompts": np.array(c["texts"])} for _ in range(steps + 1)]  # one leaf
        learner.train(data)
        if len(phases) != steps + 1 or any("update" not in p for p in phases):
            raise SystemExit(f"tunix ran {len(phases)} rollouts, expected {steps + 1}: {phases}")
        runs = phases[1:]
        med = {k: statistics.median(r[k] for r in runs) for k in ("rollout", "reference", "update",
                                                                  "step")}
        rows, T = len(c["texts"]) * n, c["prompt_bucket"] + new
        fwd = forward_flops(m, rows, T)
        rec.update({f"{k}_s": round(v, 3) for k, v in med.items()})
        rec.update(compile_s=round(phases[0]["step"] - med["step"], 2), rows=rows, seq_len=T,
                   steps_s=[round(r["step"], 2) for r in runs],
                   update_flops_util=round(3 * fwd / med["update"] / (out["matmul_peak_gflops"] * 1e9), 3),
                   reference_flops_util=round(fwd / med["reference"] / (out["matmul_peak_gflops"] * 1e9), 3))
        out[name] = rec
    out["peak_rss_gb"] = round(peak_rss_gb(), 2)
    return out


# -- driver ------------------------------------------------------------------------------------
def _child(python: str, side: str, spec: dict) -> dict:
    """Run one side on ``spec`` in its own process; a failure comes back as ``{"error": ...}``."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        res = subprocess.run([python, __file__, "--side", side, "--spec", f.name],
                             capture_output=True, text=True, env=env)
    finally:
        os.unlink(f.name)
    if res.returncode:
        return {"error": f"exit status {res.returncode} (negative: killed by that signal, e.g. "
                         f"-9 by the OOM killer): {res.stderr[-1500:]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def report(spec: dict, ours: dict | None, peer: dict | None) -> list[dict]:
    hf_cfg = json.loads((Path(spec["folder"]) / "config.json").read_text())
    m = model_numbers(hf_cfg)
    lines = []
    for name, c in spec["configs"].items():
        P, n, new = len(c["ids"]), c["n"], c["new_tokens"]
        row = {"config": name, "work": f"{P} prompts x {n} samples, prompt bucket "
                                       f"{c['prompt_bucket']}, {new} sampled tokens, fp32"
                                       + ("" if c["full_step"] else ", rollout only")}
        for label, side in (("ours", ours), ("tunix", peer)):
            if side is None:
                continue
            rec = side[name]
            row[label] = rec
            row[f"{label}_machine"] = {k: side[k] for k in ("matmul_peak_gflops",
                                                            "copy_bandwidth_gbs", "peak_rss_gb")}
            # decode bound: weights + keys/values a step reads, (shared prompt KV read once per
            # unique context for ours after prefix sharing; per row for tunix), mid-completion
            kv = (P * n * (c["prompt_bucket"] + new / 2))
            bound_s = new * decode_bytes(m, P * n, kv) / (side["copy_bandwidth_gbs"] * 1e9)
            rec["decode_bandwidth_bound_s"] = round(bound_s, 2)
            rec["rollout_over_bound"] = round(rec["rollout_s"] / bound_s, 2)
        if ours and peer:
            if ours[name]["prompt_tokens"] != peer[name]["prompt_tokens"]:
                sys.exit(f"{name}: prompt tokens differ: {ours[name]['prompt_tokens']} vs "
                         f"{peer[name]['prompt_tokens']}")
            keys = ["rollout_s"] + (["reference_s", "update_s", "step_s"] if c["full_step"] else [])
            row["ratio_ours_over_tunix"] = {k: round(ours[name][k] / peer[name][k], 3) for k in keys}
        lines.append(row)
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="rl,fst")
    ap.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up")
    ap.add_argument("--sides", default="ours,tunix")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        spec = json.loads(Path(args.spec).read_text())
        print(json.dumps(run_ours(spec) if args.side == "ours" else run_tunix(spec)), flush=True)
        return
    spec = build_spec(args.configs.split(","), args.steps)
    sides = args.sides.split(",")
    if "tunix" in sides and not TUNIX_PY.exists():
        sys.exit(f"no tunix venv at {TUNIX_PY.parent.parent}: run benchmarks/setup_tunix_venv.sh")
    # One process per (configuration, side): each peak RSS is its own, and a side that fails
    # (e.g. killed for memory on a shared machine) does not lose the other figures.
    for name, c in spec["configs"].items():
        one = {**spec, "configs": {name: c}}
        got = {}
        for side in sides:
            got[side] = _child(sys.executable if side == "ours" else str(TUNIX_PY), side, one)
            print(json.dumps({"config": name, "side": side, **got[side]}), flush=True)
        if all("error" not in r for r in got.values()):
            for line in report(one, got.get("ours"), got.get("tunix")):
                print(json.dumps(line), flush=True)

if __name__ == "__main__":
    main()
