"""A quick screen for tasks with headroom: greedy accuracy of the bundled SmolLM2-135M-Instruct on a
few test problems of each candidate task (reasoning-gym generators at easy settings), with the task's
seed context and with its original prompt. Cheaper than ``base_rates.py`` (no samples at T 1), to
choose which tasks deserve a full base rate. One JSON line per task (scores and the first greedy
completion of each prompt) to stdout and to ``--out``.

    nice -n 10 python benchmarks/screen_tasks.py [--n 24] [--max-new-tokens 96]
        [--out benchmarks/results_task_screen.jsonl]
        [--candidates '[["arithmetic", {"operators": ["+"]}], ["rg:products", {}]]']
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from base_rates import generate  # noqa: E402
from fst_jax.sampling import Sampler, SamplingConfig  # noqa: E402
from fst_jax.tasks import make_task, safe_reward  # noqa: E402

CANDIDATES = (
    ("rg:spell_backward", {"min_word_len": 3, "max_word_len": 5}),
    ("rg:letter_counting", {"min_words": 3, "max_words": 6}),
    ("rg:chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}),
    ("rg:products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    ("rg:leg_counting", {"min_animals": 1, "max_animals": 2, "min_instances": 1, "max_instances": 3}),
    ("rg:word_sequence_reversal", {"min_words": 3, "max_words": 4}),
    ("rg:gcd", {"min_value": 1, "max_value": 30}),
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--out", default="benchmarks/results_task_screen.jsonl")
    parser.add_argument("--candidates", type=json.loads, default=CANDIDATES,
                        help="JSON list of [task, options] pairs to screen instead of the built-in ones")
    args = parser.parse_args()
    sampler = Sampler.load("smollm2-135m-instruct", SamplingConfig(
        max_new_tokens=args.max_new_tokens, max_prompts_per_batch=args.n, prompt_buckets=(128, 256, 512)))
    with open(args.out, "w") as f:
        for name, options in args.candidates:
            start = time.perf_counter()
            task = make_task(name, **options)
            examples = task.examples("test", args.n, seed=0)
            row = {"task": name, "options": options, "n": args.n, "max_new_tokens": args.max_new_tokens}
            for label, context in (("seed_context", task.seed_context), ("original_prompt", task.original_prompt)):
                outs = generate(sampler, [(context, e.prompt) for e in examples], 1, 0.0, 0, args.max_new_tokens)
                scores = [safe_reward(task, e, o[0])[0] for e, o in zip(examples, outs)]
                row[f"greedy_{label}"] = sum(scores) / len(scores)
                row[f"example_{label}"] = outs[0][0][:200]
            row["seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
