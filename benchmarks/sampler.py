"""Sampler throughput: fst_jax's jitted sampler vs transformers' torch ``generate``, same run.

Model: SmolLM2-135M-Instruct (bundled), fp32. Each prompt is a chat prompt with a context of
about 200 tokens and a task of about 60 tokens; 128 new tokens, EOS ignored so every row
generates all 128 (both sides), temperature 1. Configurations: batch 1, 8, 32, and grouped
(8 problems x 8 samples with 2 contexts per problem group = 16 unique prompts x 4 samples: ours
prefills each context once and each unique prompt once against it, sharing both KV caches;
torch expands it with ``num_return_sequences``). Utilisation = achieved decode FLOP/s over a float32 matmul peak
measured in the same run. Prints one JSON object per configuration.

``--bf16-weights`` also times our sampler on a weight-only bfloat16 copy of the parameters (the
model computes in float32 and casts each weight on use; the trainer would keep float32), side by
side with the float32 weights, and reports its tokens/s and the ratio to float32's.

    python benchmarks/sampler.py [--configs b1,b8,b32,grouped] [--repeats 2] [--bf16-weights]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fst_jax.models.bundled import prepare_smollm2  # noqa: E402
from fst_jax.models.tokenizer import ChatTokenizer  # noqa: E402
from fst_jax.models.weights import load_hf_folder  # noqa: E402
from fst_jax.sampling import Sampler, SamplingConfig, share_plan  # noqa: E402

NEW_TOKENS = 128
RULES = ("Solve the arithmetic word problem step by step. Read the question twice, identify "
         "the quantities and the operation, compute carefully, check the result by estimating, "
         "and write the final answer as a plain number on its own line after '####'. ")


def contexts(tokenizer, k: int) -> list[str]:
    """``k`` distinct contexts of about 200 tokens each."""
    out = []
    for i in range(k):
        text = f"Context variant {i}. "
        while tokenizer.count_context_tokens(text) < 195:
            text += RULES
        out.append(text)
    return out


def task(i: int) -> str:
    return (f"Problem {i}: A shop sells {12 + i} boxes of pencils on Monday and {30 + 2 * i} "
            f"boxes on Tuesday. Each box holds {6 + i % 5} pencils. The shop also returns "
            f"{3 + i} boxes to its supplier. How many pencils did the shop sell in total over "
            "the two days, not counting the returned boxes?")


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def decode_flops_per_token(cfg, context_len: float) -> float:
    """Forward FLOPs for one decoded token: 2 x matmul weights + attention over the context."""
    D, F, L, H, K, hd, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
                            cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)
    weights = L * (D * H * hd + 2 * D * K * hd + H * hd * D + 3 * D * F) + D * V
    return 2 * weights + 4 * L * H * hd * context_len


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def run_ours(sampler, pairs, n, repeats, params=None):
    params = sampler.params if params is None else params
    prompts = sampler.encode(pairs)
    t = time.perf_counter()
    sampler.generate(params, prompts, n=n, seed=0)
    first = time.perf_counter() - t
    prefill_s, total_s = [], []
    for r in range(repeats):
        t = time.perf_counter()
        plan = share_plan(prompts, sampler.config.prompt_buckets, sampler.tokenizer.pad_id)
        jax.block_until_ready(sampler.prefill(params, plan, n))
        prefill_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = sampler.generate(params, prompts, n=n, seed=r + 1)
        total_s.append(time.perf_counter() - t)
    prefill, total = min(prefill_s), min(total_s)
    tokens = int(out.lengths.sum())
    return {"compile_s": round(first - total, 2), "prefill_s": round(prefill, 3),
            "decode_s": round(total - prefill, 3), "tokens": tokens,
            "tok_s": tokens / total, "decode_tok_s": tokens / (total - prefill),
            "prompt_len": int(prompts.lengths.mean())}


def run_torch(folder, tokenizer, pairs, n, repeats):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    hf = tokenizer.hf
    hf.padding_side = "left"
    texts = [hf.apply_chat_template([{"role": "system", "content": c}, {"role": "user", "content": q}],
                                    tokenize=False, add_generation_prompt=True) for c, q in pairs]
    enc = hf(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.0,
              top_p=1.0, top_k=0, num_return_sequences=n, pad_token_id=tokenizer.pad_id)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t = time.perf_counter()
            out = model.generate(**enc, **kw)
            times.append(time.perf_counter() - t)
    tokens = (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    return tokens / min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="b1,b8,b32,grouped")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bf16-weights", action="store_true")
    args = parser.parse_args()
    folder = prepare_smollm2()
    cfg, model = load_hf_folder(folder)
    tokenizer = ChatTokenizer(folder, max_context_tokens=512)
    sampler = Sampler(model, tokenizer, SamplingConfig(
        max_new_tokens=NEW_TOKENS, temperature=1.0, prompt_buckets=(320, 512), stop_at_eos=False,
        max_prompts_per_batch=64))
    peak = matmul_peak_flops()
    ctx = contexts(tokenizer, 2)
    setups = {
        "b1": ([(ctx[0], task(0))], 1),
        "b8": ([(ctx[i % 2], task(i)) for i in range(8)], 1),
        "b32": ([(ctx[i % 2], task(i)) for i in range(32)], 1),
        # 8 problems, each group of 8 samples split over 2 contexts: 16 unique prompts x 4.
        "grouped": ([(ctx[k], task(p)) for p in range(8) for k in range(2)], 4),
    }
    for name in args.configs.split(","):
        pairs, n = setups[name]
        ours = run_ours(sampler, pairs, n, args.repeats)
        bf16 = {}
        if args.bf16_weights:
            copy = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, sampler.params)
            tok_s = run_ours(sampler, pairs, n, args.repeats, copy)["tok_s"]
            bf16 = {"ours_bf16_weights_tok_s": round(tok_s, 1), "bf16_over_fp32": round(tok_s / ours["tok_s"], 2)}
        peer_tok_s = run_torch(str(folder), tokenizer, pairs, n, args.repeats)
        ctx_len = ours["prompt_len"] + NEW_TOKENS / 2
        util = ours["decode_tok_s"] * decode_flops_per_token(cfg, ctx_len) / peak
        print(json.dumps({
            "config": f"{name}: {len(pairs)} prompts x {n} samples, ~{ours['prompt_len']} prompt "
                      f"tokens, {NEW_TOKENS} new, fp32, temperature 1",
            "ours_tok_s": round(ours["tok_s"], 1),
            "ours_decode_tok_s": round(ours["decode_tok_s"], 1),
            "compile_s": ours["compile_s"], "prefill_s": ours["prefill_s"],
            "peer": f"transformers {__import__('transformers').__version__} torch generate "
                    f"(num_return_sequences={n})",
            "peer_tok_s": round(peer_tok_s, 1),
            "ratio": round(ours["tok_s"] / peer_tok_s, 2),
            **bf16,
            "utilisation": round(util, 3),
            "matmul_peak_gflops": round(peak / 1e9, 1),
            "peak_rss_gb": round(rss_gb(), 2),
        }), flush=True)


if __name__ == "__main__":
    main()
